"""The AWS boundary: the one session factory and the clients (aioboto3 only), and the
classification of their errors (`dispatcher.aws.api`)."""
