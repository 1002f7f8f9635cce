"""The daemon: the long-running service and its loops.

`service` wires them together: `intake` (receive, wait, start through `starter`),
`events` (status changes), `reconcile` (listings), `callbacks` (task tokens),
`lastreceive`, `lease`, `limits` (live limits), the queues' helpers (`queues`,
`deleter`, `deadletter`), and what operators see (`metrics`, `health`, `http`).
"""
