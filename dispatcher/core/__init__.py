"""The pure core: the admission decision without I/O.

The slot ledger (`ledger`), the waiting room (`waiting`), a pool's state and wake-up
(`pool`), the StartExecution rate (`rate`) and the parsing of request messages
(`requests`). Nothing here calls AWS; the daemon feeds it what AWS said.
"""
