"""The asyncio Python client: producers, workers and observers."""
