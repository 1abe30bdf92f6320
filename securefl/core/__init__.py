"""The floor everything rests on: the message, the party context, the Aggregator and Trainer types, the
training loops and seeding. It imports nothing else of securefl (``tests/test_architecture.py``)."""
