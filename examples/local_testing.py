"""The seeds' local-testing pattern: ``local=True`` runs in this process, returns the value.

Arguments and the result still make the serialization round trip, so what would fail
remotely for not being serializable fails here too.

Run: python examples/local_testing.py
"""

import asyncio

from flash_actors import LiveServerless, remote

config = LiveServerless(name="local-testing")


@remote(resource_config=config, local=True)
async def my_function(data):
    return {"status": "ok", "items": len(data)}


async def main():
    result = await my_function([1, 2, 3])
    print(result)


if __name__ == "__main__":
    asyncio.run(main())
