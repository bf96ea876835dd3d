"""A GPU endpoint: each worker sees its own GPU (``CUDA_VISIBLE_DEVICES``).

On a machine with an NVIDIA GPU this prints the number of CUDA devices the worker sees (one
per worker: ``gpuCount``). On a machine without one the call fails at once with a message
saying what was asked, what the machine has and how to run it; with
``FLASH_LOCAL_GPU=cpu`` the endpoint runs on the CPU instead, and the remote ``OSError``
(no CUDA driver) comes back typed, with its traceback.

Run: python examples/gpu_check.py      (or FLASH_LOCAL_GPU=cpu python examples/gpu_check.py)
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
