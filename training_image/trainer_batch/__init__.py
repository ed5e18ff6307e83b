"""Runs the trainer outside SageMaker under SageMaker's directory contract.

`channels` materialises the contract from S3 (train manifest, champion,
hyperparameters) and packages `model/` the way SageMaker does; `launcher` is the
AWS Batch container command. The local training backend (chalicelib.backends)
uses `channels` too, so the three backends lay out the same files.
"""
