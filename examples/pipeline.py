"""The seeds' hybrid CPU/GPU pipeline: preprocess on a CPU endpoint, infer on a GPU one.

On a machine without a GPU the GPU endpoint still runs (here in-process); code that needs
CUDA would fail with the remote error.

Run: python examples/pipeline.py
"""

import asyncio

from flash_actors import CpuInstanceType, GpuGroup, LiveServerless, remote

cpu_config = LiveServerless(
    name="preprocessor", instanceIds=[CpuInstanceType.CPU5C_4_8]
)
gpu_config = LiveServerless(name="inference", gpus=[GpuGroup.AMPERE_80])


@remote(resource_config=cpu_config)
async def preprocess(data):
    return [{"x": float(row["x"]) / 10} for row in data]


@remote(resource_config=gpu_config)
async def inference(data):
    return {"result": sum(row["x"] for row in data)}


async def pipeline(raw_data):
    clean = await preprocess(raw_data)
    return await inference(clean.output)


async def main():
    job = await pipeline([{"x": "10"}, {"x": "20"}, {"x": "30"}])
    print(job.output)


if __name__ == "__main__":
    asyncio.run(main())
