"""genai-mlflow compare: which prompt, model or variant is better, from what landed in MLflow."""
