"""EventBridge sources and detail types the pipeline sends and listens to."""

from __future__ import annotations

# The pipeline's own events (the stage may name another source: MLEDGE_EVENT_SOURCE).
PIPELINE_SOURCE = "mledge.pipeline"
MODEL_APPROVED = "ModelApproved"

# Training state changes: SageMaker's and Batch's, and the local backend's, which
# sends SageMaker's shape under its own source.
SAGEMAKER_SOURCE = "aws.sagemaker"
SAGEMAKER_DETAIL_TYPE = "SageMaker Training Job State Change"
BATCH_SOURCE = "aws.batch"
BATCH_DETAIL_TYPE = "Batch Job State Change"
LOCAL_TRAINING_SOURCE = "mledge.local-training"
