"""Spans to MLflow: pricing, record translation, spool, writer and the MLflow gateway."""
