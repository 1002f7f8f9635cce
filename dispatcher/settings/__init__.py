"""Settings: what the dispatcher is told to do, read once at start-up and validated.

`config` declares the settings (environment, flags, config file); `layout` the pools,
their queues, limits and priorities.
"""
