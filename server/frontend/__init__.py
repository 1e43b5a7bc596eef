"""The HTTP front end: asyncio only, never imports torch, the runner or the model."""
