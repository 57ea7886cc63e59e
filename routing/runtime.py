async def startup() -> None:
    pass


async def shutdown() -> None:
    pass
