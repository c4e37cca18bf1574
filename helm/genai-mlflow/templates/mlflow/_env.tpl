{{/* Environment of both MLflow containers (migrate and serve): the database and auth settings
read by files/mlflow-entrypoint.py. */}}
{{- define "genai-mlflow.mlflow.dbEnv" -}}
- name: DB_HOST
  value: {{ include "genai-mlflow.database.host" . | quote }}
- name: DB_PORT
  value: {{ include "genai-mlflow.database.port" . | quote }}
- name: DB_NAME
  value: {{ include "genai-mlflow.database.name" . | quote }}
- name: DB_USER
  value: {{ include "genai-mlflow.database.user" . | quote }}
- name: DB_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "genai-mlflow.database.secretName" . }}
      key: {{ include "genai-mlflow.database.secretKey" . }}
- name: DB_SSLMODE
  value: {{ include "genai-mlflow.database.sslmode" . | quote }}
- name: AUTH_ENABLED
  value: {{ .Values.mlflow.auth.enabled | quote }}
{{- if .Values.mlflow.auth.enabled }}
- name: AUTH_DB_NAME
  value: {{ .Values.mlflow.auth.database | quote }}
- name: AUTH_CREATE_DB
  value: {{ .Values.mlflow.auth.createDatabase | quote }}
{{- end }}
- name: HOME
  value: /tmp
- name: PYTHONDONTWRITEBYTECODE
  value: "1"
- name: PYTHONUNBUFFERED
  value: "1"
- name: MLFLOW_DISABLE_TELEMETRY
  value: "true"
- name: DO_NOT_TRACK
  value: "true"
{{- end }}
