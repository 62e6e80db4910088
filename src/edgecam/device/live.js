// edgecam live view page: WebRTC first, MSE (fragmented MP4 over the same WebSocket) when
// WebRTC does not connect. No dependencies. Part of edgecam (MIT licence).
"use strict";

(() => {
  const cfg = JSON.parse(document.getElementById("live-config").textContent);
  const video = document.getElementById("video");
  const statusEl = document.getElementById("status");
  const countsEl = document.getElementById("counts");
  const clipButton = document.getElementById("save-clip");
  const clipResult = document.getElementById("clip-result");
  const forced = new URLSearchParams(location.search).get("mode");

  // State the tests and the latency benchmark read.
  const live = { mode: null, state: "starting", frames: 0, connects: 0, counts: {} };
  window.edgecamLive = live;

  const RETRY_MS = 2000;
  // No frame over WebRTC this soon: MSE instead. Shorter than the device's
  // live.connect_timeout_s (at least 10 s), after which it drops a viewer not connected.
  const WEBRTC_TIMEOUT_MS = 8000;
  // MSE: how far behind the newest frame playback may fall before it jumps ahead.
  const MAX_LAG_S = 0.5;
  const CHASE_LAG_S = 0.15;
  const KEEP_S = 10;
  // Playing, but no new frame for this long: the page says so (a frozen picture is not live).
  const STALL_MS = 3000;

  let session = null;

  function setStatus(state, text = state) {
    live.state = state;
    statusEl.textContent = `${live.mode || ""} ${text}`.trim();
  }

  // "playing" <-> "stalled": frames must keep coming while the page says it plays. Counted
  // by frame callbacks; without them, by the playback time, which a WebRTC stream advances
  // with no frames, so there only MSE is watched. Not while the tab is hidden (browsers stop
  // the frame callbacks there), and counted afresh from each connection.
  let progressAt = Date.now();
  function watchStalls() {
    const counted = "requestVideoFrameCallback" in HTMLVideoElement.prototype;
    const progress = () => (counted ? live.frames : video.srcObject ? -1 : video.currentTime);
    let last = progress();
    setInterval(() => {
      const now = Date.now();
      const current = progress();
      if (current !== last || current === -1 || document.hidden) {
        last = current;
        progressAt = now;
        if (live.state === "stalled") setStatus("playing");
      } else if (
        (live.state === "playing" || live.state === "stalled") &&
        now - progressAt >= STALL_MS
      ) {
        const seconds = Math.round((now - progressAt) / 1000);
        setStatus("stalled", `no new picture for ${seconds} s`);
      }
    }, 1000);
  }

  function socketUrl(mode) {
    const proto = location.protocol === "https:" ? "wss:" : "ws:";
    return `${proto}//${location.host}${cfg.ws}?mode=${mode}`;
  }

  function showCounts(message) {
    live.counts = message.counts || {};
    const rows = Object.entries(live.counts).map(([k, v]) => `<dt>${esc(k)}</dt><dd>${v}</dd>`);
    const viewers = message.viewers || {};
    const watching = (viewers.webrtc || 0) + (viewers.mse || 0);
    rows.push(`<dt>viewers</dt><dd>${watching}</dd>`);
    countsEl.innerHTML = rows.join("");
  }

  function esc(text) {
    return String(text).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
  }

  function countFrames() {
    if (!("requestVideoFrameCallback" in HTMLVideoElement.prototype)) return;
    const onFrame = (_now, meta) => {
      live.frames += 1;
      if (live.onFrame) live.onFrame(meta);
      video.requestVideoFrameCallback(onFrame);
    };
    video.requestVideoFrameCallback(onFrame);
  }

  // One connection (WebRTC or MSE) to the device; `stop()` ends it.
  class Session {
    constructor(mode) {
      this.mode = mode;
      this.closed = false;
      this.error = null;
      this.ws = new WebSocket(socketUrl(mode));
      this.ws.binaryType = "arraybuffer";
      this.ws.onmessage = (ev) => this.onMessage(ev);
      this.ws.onclose = (ev) => this.onClose(ev);
      this.ws.onopen = () => setStatus("waiting for video");
      this.ping = setInterval(() => this.send({ type: "ping" }), cfg.pingMs);
      live.mode = mode;
      live.connects += 1;
      progressAt = Date.now();
      setStatus("connecting");
    }

    send(message) {
      if (this.ws.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify(message));
    }

    onMessage(ev) {
      if (typeof ev.data !== "string") {
        this.onMedia(ev.data);
        return;
      }
      const message = JSON.parse(ev.data);
      if (message.type === "counts") showCounts(message);
      else if (message.type === "error") {
        this.error = message.error;
        setStatus("refused", message.error);
      }
      else this.onSignal(message);
    }

    onClose(ev) {
      if (this.closed) return;
      this.stop();
      if (ev.code === 1008) setStatus("not authorised");
      else if (this.error) setStatus("reconnecting", `${this.error}; trying again`);
      else setStatus("reconnecting");
      setTimeout(() => connect(this.mode), RETRY_MS);
    }

    stop() {
      this.closed = true;
      clearInterval(this.ping);
      this.ws.onclose = null;
      this.ws.close();
    }

    onMedia(_data) {}
    onSignal(_message) {}
  }

  class WebRtcSession extends Session {
    constructor() {
      super("webrtc");
      this.pc = new RTCPeerConnection({ iceServers: cfg.iceServers });
      this.pc.ontrack = (ev) => {
        // Play as soon as a frame is decoded: a live camera, not a film.
        if ("jitterBufferTarget" in ev.receiver) ev.receiver.jitterBufferTarget = 0;
        video.srcObject = new MediaStream([ev.track]);
        video.play().catch(() => {});
      };
      this.pc.onicecandidate = (ev) => {
        if (ev.candidate && ev.candidate.candidate) {
          this.send({
            type: "ice",
            candidate: ev.candidate.candidate,
            sdpMLineIndex: ev.candidate.sdpMLineIndex,
          });
        }
      };
      this.pc.onconnectionstatechange = () => {
        const state = this.pc.connectionState;
        if (state === "connected") setStatus("playing");
        else if (state === "failed") this.giveUp();
      };
      const frames = live.frames;
      this.timer = setTimeout(() => {
        if (live.frames === frames) this.giveUp();
      }, WEBRTC_TIMEOUT_MS);
    }

    async onSignal(message) {
      if (message.type === "offer") {
        await this.pc.setRemoteDescription({ type: "offer", sdp: message.sdp });
        const answer = await this.pc.createAnswer();
        await this.pc.setLocalDescription(answer);
        this.send({ type: "answer", sdp: answer.sdp });
      } else if (message.type === "ice") {
        await this.pc.addIceCandidate({
          candidate: message.candidate,
          sdpMLineIndex: message.sdpMLineIndex,
        });
      }
    }

    giveUp() {
      if (this.closed) return;
      if (forced === "webrtc") {
        this.stop();
        setStatus("WebRTC failed; retrying");
        setTimeout(() => connect("webrtc"), RETRY_MS);
      } else {
        this.stop();
        connect("mse");
      }
    }

    stop() {
      super.stop();
      clearTimeout(this.timer);
      this.pc.close();
    }
  }

  class MseSession extends Session {
    constructor() {
      super("mse");
      this.pending = [];
      this.buffer = null;
      this.codec = null;
      this.chaser = setInterval(() => this.chase(), 200);
    }

    onSignal(message) {
      if (message.type === "codec" && message.codec !== this.codec) this.open(message.codec);
    }

    open(codec) {
      this.codec = codec;
      this.buffer = null;
      const source = new MediaSource();
      video.srcObject = null;
      video.src = URL.createObjectURL(source);
      source.addEventListener(
        "sourceopen",
        () => {
          URL.revokeObjectURL(video.src);
          this.buffer = source.addSourceBuffer(`video/mp4; codecs="${codec}"`);
          this.buffer.mode = "segments";
          this.buffer.addEventListener("updateend", () => this.append());
          this.append();
        },
        { once: true },
      );
      video.play().catch(() => {});
    }

    onMedia(data) {
      this.pending.push(new Uint8Array(data));
      this.append();
    }

    append() {
      const buffer = this.buffer;
      if (!buffer || buffer.updating || this.pending.length === 0) return;
      const size = this.pending.reduce((n, a) => n + a.length, 0);
      const joined = new Uint8Array(size);
      let offset = 0;
      for (const part of this.pending) {
        joined.set(part, offset);
        offset += part.length;
      }
      this.pending = [];
      try {
        buffer.appendBuffer(joined);
      } catch (err) {
        setStatus(`append failed: ${err.name}`);
      }
    }

    // Stay at the live edge: jump over gaps (a restarted camera) and drop what was watched.
    chase() {
      const ranges = video.buffered;
      if (ranges.length === 0) return;
      const end = ranges.end(ranges.length - 1);
      const start = ranges.start(ranges.length - 1);
      if (end - video.currentTime > MAX_LAG_S || video.currentTime < start) {
        video.currentTime = Math.max(start, end - CHASE_LAG_S);
      }
      if (video.paused) video.play().catch(() => {});
      const waiting = live.state !== "playing" && live.state !== "stalled";
      if (waiting && video.currentTime > 0) setStatus("playing");
      const buffer = this.buffer;
      if (buffer && !buffer.updating && video.currentTime - ranges.start(0) > 2 * KEEP_S) {
        buffer.remove(0, video.currentTime - KEEP_S);
      }
    }

    stop() {
      super.stop();
      clearInterval(this.chaser);
    }
  }

  function connect(mode) {
    if (session) session.stop();
    session = mode === "webrtc" ? new WebRtcSession() : new MseSession();
  }

  clipButton.addEventListener("click", async () => {
    clipButton.disabled = true;
    clipResult.textContent = "saving…";
    try {
      const response = await fetch(cfg.clip, {
        method: "POST",
        headers: { "X-Edgecam-Live": "1" },
        credentials: "same-origin",
      });
      const body = await response.json();
      clipResult.textContent = response.ok ? `saved: ${body.name || "requested"}` : body.error;
    } catch (err) {
      clipResult.textContent = `failed: ${err}`;
    } finally {
      clipButton.disabled = false;
    }
  });

  countFrames();
  watchStalls();
  const canWebRtc = cfg.webrtc && "RTCPeerConnection" in window;
  connect(forced === "mse" || (!canWebRtc && forced !== "webrtc") ? "mse" : "webrtc");
})();
