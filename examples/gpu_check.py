"""A GPU endpoint: runs anywhere, and code that needs CUDA fails with the remote error.

On a machine with an NVIDIA driver this prints the number of CUDA devices; without one the
remote ``OSError`` comes back typed, with its traceback, instead of hanging.

Run: python examples/gpu_check.py
"""

import asyncio

from flash_actors import GpuGroup, LiveServerless, remote

gpu_config = LiveServerless(name="gpu-check", gpus=[GpuGroup.ANY])


@remote(resource_config=gpu_config)
async def cuda_devices():
    import ctypes

    cuda = ctypes.CDLL("libcuda.so.1")  # the NVIDIA driver's CUDA library
    if cuda.cuInit(0) != 0:
        raise RuntimeError("cuInit failed: no usable CUDA device")
    count = ctypes.c_int()
    cuda.cuDeviceGetCount(ctypes.byref(count))
    return count.value


async def main():
    job = await cuda_devices()
    if job.error:
        print(f"no CUDA here: {job.error.strip().splitlines()[-1]}")
    else:
        print(f"CUDA devices: {job.output}")


if __name__ == "__main__":
    asyncio.run(main())
