"""GStreamer: sources, the inference pipeline, streaming and recording."""
