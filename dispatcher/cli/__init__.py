"""The ``sfn-dispatcher`` command: `main` and one module per sub-command (`run`, `check`,
`status`/`pause`/`resume`/`drain` in `control`, `redrive`, `submit`)."""
