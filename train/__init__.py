"""The trainer process: Kafka in (``stream/``), the FM updated (``model/``), Redis out.

- :mod:`train.loop` the training loop (exactly once through checkpointed positions);
- :mod:`train.resilience` lease keeper, dead-letter outbox, guarded publishing;
- :mod:`train.lease` the Redis lease (one active trainer per model);
- :mod:`train.publisher` what is published to Redis and when;
- :mod:`train.store_writer` the write side of the Redis layout (:mod:`serving.keys`);
- :mod:`train.metrics` the trainer's Prometheus metrics;
- :mod:`train.config` the narrow configs the entry point (``fmstream/``) builds from Settings.
"""
