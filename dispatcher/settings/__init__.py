"""Settings: what the dispatcher is told to do, read once at start-up and validated.

`config` declares every setting once (its variable, flag and config-file key are derived;
`config.SETTINGS_TABLE` lists them) and gathers them by one precedence: flag, variable,
config file, default. `layout` reads the config file's pools and queues; `layout.attempt`
is the one loader of `run`, `check`, the control commands and a reload.
"""
