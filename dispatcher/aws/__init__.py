"""The AWS boundary: the clients (aioboto3 only) and the classification of their errors."""
