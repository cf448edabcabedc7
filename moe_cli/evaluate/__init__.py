"""Metrics: accuracy/CE (train.tasks), routing statistics, FLOPs and parameters."""
