"""Does this GPU have NVENC / NVDEC? NVML's encoder capacity query answers NOT_SUPPORTED
where the chip has no encoder."""
import ctypes

nvml = ctypes.CDLL("libnvidia-ml.so.1")
assert nvml.nvmlInit_v2() == 0
dev = ctypes.c_void_p()
assert nvml.nvmlDeviceGetHandleByIndex_v2(0, ctypes.byref(dev)) == 0
name = ctypes.create_string_buffer(96)
nvml.nvmlDeviceGetName(dev, name, 96)
err = ctypes.CFUNCTYPE(ctypes.c_char_p, ctypes.c_int)(("nvmlErrorString", nvml))
cap = ctypes.c_uint()
for codec, q in (("H264", 0), ("HEVC", 1)):
    rc = nvml.nvmlDeviceGetEncoderCapacity(dev, q, ctypes.byref(cap))
    print(name.value.decode(), "encoder capacity", codec, "rc", rc, err(rc).decode(), "value", cap.value)
util, period = ctypes.c_uint(), ctypes.c_uint()
rc = nvml.nvmlDeviceGetDecoderUtilization(dev, ctypes.byref(util), ctypes.byref(period))
print("decoder utilization rc", rc, err(rc).decode(), util.value)
rc = nvml.nvmlDeviceGetEncoderUtilization(dev, ctypes.byref(util), ctypes.byref(period))
print("encoder utilization rc", rc, err(rc).decode(), util.value)
