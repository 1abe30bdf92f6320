"""The floor everything rests on: the message and its codec, sealed values, the party context, the Aggregator
and Trainer types with their plain implementations and the training loops, seeding, durable writes, and the
config sections' base. It imports nothing else of securefl (import-linter, ``tests/test_architecture.py``)."""
