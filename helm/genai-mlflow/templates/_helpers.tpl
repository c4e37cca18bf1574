{{/* ---------------------------------------------------------------- names */}}

{{- define "genai-mlflow.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The release's base name; `genai-mlflow` for a release named `genai-mlflow`. Kept at most
43 characters so that the longest suffix (`-collector-headless`) still fits in 63. */}}
{{- define "genai-mlflow.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 43 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 43 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 43 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "genai-mlflow.mlflow.fullname" -}}{{ include "genai-mlflow.fullname" . }}-mlflow{{- end -}}
{{- define "genai-mlflow.postgresql.fullname" -}}{{ include "genai-mlflow.fullname" . }}-postgresql{{- end -}}
{{- define "genai-mlflow.minio.fullname" -}}{{ include "genai-mlflow.fullname" . }}-minio{{- end -}}
{{- define "genai-mlflow.collector.fullname" -}}{{ include "genai-mlflow.fullname" . }}-collector{{- end -}}
{{- define "genai-mlflow.collector.headless" -}}{{ include "genai-mlflow.fullname" . }}-collector-headless{{- end -}}
{{- define "genai-mlflow.gateway.fullname" -}}{{ include "genai-mlflow.fullname" . }}-otel-gateway{{- end -}}

{{- define "genai-mlflow.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "genai-mlflow.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* ---------------------------------------------------------------- labels */}}

{{- define "genai-mlflow.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels of one component: (dict "ctx" $ "component" "mlflow"). */}}
{{- define "genai-mlflow.selectorLabels" -}}
app.kubernetes.io/name: {{ include "genai-mlflow.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Every label of one component's objects: (dict "ctx" $ "component" "mlflow"). */}}
{{- define "genai-mlflow.labels" -}}
helm.sh/chart: {{ include "genai-mlflow.chart" .ctx }}
{{ include "genai-mlflow.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: genai-mlflow
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* ---------------------------------------------------------------- pods */}}

{{- define "genai-mlflow.image" -}}
{{- printf "%s:%s" .repository (toString .tag) -}}
{{- end -}}

{{/* Pod-level security context: (dict "ctx" $ "pod" .Values.mlflow.podSecurityContext). */}}
{{- define "genai-mlflow.podSecurityContext" -}}
runAsNonRoot: true
{{- with .pod }}
{{ toYaml . }}
{{- end }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "genai-mlflow.containerSecurityContext" -}}
{{ toYaml .Values.containerSecurityContext }}
{{- end -}}

{{/* A number as PromQL and people read it: 5000000, not 5e+06. */}}
{{- define "genai-mlflow.number" -}}
{{- if eq (float64 (int64 .)) (float64 .) -}}{{ int64 . }}{{- else -}}{{ . }}{{- end -}}
{{- end -}}

{{/* A writable /tmp on a read-only root filesystem. */}}
{{- define "genai-mlflow.tmpVolume" -}}
- name: tmp
  emptyDir:
    sizeLimit: 256Mi
{{- end -}}

{{/* ---------------------------------------------------------------- secrets */}}

{{/* The value of `key` in Secret `name`: kept from the live object when it exists (so that an
upgrade never changes a password), else freshly generated. Base64, ready for `data:`.
(dict "ctx" $ "name" "secret-name" "key" "password" "length" 32) */}}
{{- define "genai-mlflow.secretValue" -}}
{{- $existing := lookup "v1" "Secret" .ctx.Release.Namespace .name -}}
{{- if and $existing (hasKey (default dict $existing.data) .key) -}}
{{- index $existing.data .key -}}
{{- else -}}
{{- randAlphaNum (int .length) | b64enc -}}
{{- end -}}
{{- end -}}

{{- define "genai-mlflow.secretAnnotations" -}}
{{- if .Values.secrets.keepOnUninstall }}
annotations:
  helm.sh/resource-policy: keep
{{- end }}
{{- end -}}

{{/* Secret and key of the database password. */}}
{{- define "genai-mlflow.database.secretName" -}}
{{- if .Values.postgresql.enabled -}}
{{- default (include "genai-mlflow.postgresql.fullname" .) .Values.postgresql.auth.existingSecret -}}
{{- else -}}
{{- .Values.externalDatabase.existingSecret -}}
{{- end -}}
{{- end -}}

{{- define "genai-mlflow.database.secretKey" -}}
{{- if .Values.postgresql.enabled -}}
{{- .Values.postgresql.auth.passwordKey -}}
{{- else -}}
{{- .Values.externalDatabase.existingSecretPasswordKey -}}
{{- end -}}
{{- end -}}

{{- define "genai-mlflow.database.host" -}}
{{- if .Values.postgresql.enabled -}}
{{- include "genai-mlflow.postgresql.fullname" . -}}
{{- else -}}
{{- .Values.externalDatabase.host -}}
{{- end -}}
{{- end -}}

{{- define "genai-mlflow.database.port" -}}
{{- if .Values.postgresql.enabled -}}5432{{- else -}}{{ .Values.externalDatabase.port }}{{- end -}}
{{- end -}}

{{- define "genai-mlflow.database.name" -}}
{{- if .Values.postgresql.enabled -}}{{ .Values.postgresql.auth.database }}{{- else -}}{{ .Values.externalDatabase.database }}{{- end -}}
{{- end -}}

{{- define "genai-mlflow.database.user" -}}
{{- if .Values.postgresql.enabled -}}{{ .Values.postgresql.auth.username }}{{- else -}}{{ .Values.externalDatabase.username }}{{- end -}}
{{- end -}}

{{- define "genai-mlflow.database.sslmode" -}}
{{- if .Values.postgresql.enabled -}}disable{{- else -}}{{ .Values.externalDatabase.sslmode }}{{- end -}}
{{- end -}}

{{/* Secret and keys of the S3 credentials MLflow uses. */}}
{{- define "genai-mlflow.s3.secretName" -}}
{{- if .Values.minio.enabled -}}
{{- default (include "genai-mlflow.minio.fullname" .) .Values.minio.auth.existingSecret -}}
{{- else -}}
{{- .Values.externalS3.existingSecret -}}
{{- end -}}
{{- end -}}

{{- define "genai-mlflow.s3.accessKeyKey" -}}
{{- if .Values.minio.enabled -}}{{ .Values.minio.auth.accessKeyKey }}{{- else -}}{{ .Values.externalS3.accessKeyIdKey }}{{- end -}}
{{- end -}}

{{- define "genai-mlflow.s3.secretKeyKey" -}}
{{- if .Values.minio.enabled -}}{{ .Values.minio.auth.secretKeyKey }}{{- else -}}{{ .Values.externalS3.secretAccessKeyKey }}{{- end -}}
{{- end -}}

{{- define "genai-mlflow.s3.endpoint" -}}
{{- if .Values.minio.enabled -}}
{{- printf "http://%s:9000" (include "genai-mlflow.minio.fullname" .) -}}
{{- else -}}
{{- .Values.externalS3.endpoint -}}
{{- end -}}
{{- end -}}

{{- define "genai-mlflow.s3.bucket" -}}
{{- if .Values.minio.enabled -}}{{ .Values.mlflow.artifacts.bucket }}{{- else -}}{{ .Values.externalS3.bucket }}{{- end -}}
{{- end -}}

{{- define "genai-mlflow.mlflow.authSecretName" -}}
{{- default (printf "%s-auth" (include "genai-mlflow.mlflow.fullname" .)) .Values.mlflow.auth.existingSecret -}}
{{- end -}}

{{- define "genai-mlflow.collector.secretName" -}}
{{- default (include "genai-mlflow.collector.fullname" .) .Values.collector.auth.existingSecret -}}
{{- end -}}

{{/* In-cluster URL of MLflow. */}}
{{- define "genai-mlflow.mlflow.url" -}}
{{- printf "http://%s:%d" (include "genai-mlflow.mlflow.fullname" .) (int .Values.mlflow.service.port) -}}
{{- end -}}

{{/* Whether each collector pod runs the OTLP/gRPC bridge for the gateway. */}}
{{- define "genai-mlflow.collector.bridge" -}}
{{- if .Values.otelCollector.enabled }}true{{ end -}}
{{- end -}}

{{/* ---------------------------------------------------------------- checks */}}

{{/* Settings that only make sense together; values.schema.json checks each value alone. */}}
{{- define "genai-mlflow.validate" -}}
{{- if and (not .Values.postgresql.enabled) (not .Values.externalDatabase.host) -}}
{{- fail "genai-mlflow: postgresql.enabled=false needs externalDatabase.host (or keep the bundled PostgreSQL)" -}}
{{- end -}}
{{- if and (not .Values.postgresql.enabled) (not .Values.externalDatabase.existingSecret) -}}
{{- fail "genai-mlflow: postgresql.enabled=false needs externalDatabase.existingSecret, a Secret with the database password (passwords are never taken from values)" -}}
{{- end -}}
{{- if and (not .Values.minio.enabled) (not .Values.externalS3.bucket) -}}
{{- fail "genai-mlflow: minio.enabled=false needs externalS3.bucket (or keep the bundled MinIO)" -}}
{{- end -}}
{{- if and (not .Values.minio.enabled) (not .Values.externalS3.existingSecret) -}}
{{- fail "genai-mlflow: minio.enabled=false needs externalS3.existingSecret, a Secret with the S3 access key pair" -}}
{{- end -}}
{{- if and .Values.mlflow.ingress.enabled (not .Values.mlflow.ingress.tls) -}}
{{- fail "genai-mlflow: mlflow.ingress.enabled=true needs mlflow.ingress.tls (MLflow is served over TLS only)" -}}
{{- end -}}
{{- if and .Values.collector.autoscaling.enabled (lt (int .Values.collector.autoscaling.maxReplicas) (int .Values.collector.autoscaling.minReplicas)) -}}
{{- fail "genai-mlflow: collector.autoscaling.maxReplicas must be >= collector.autoscaling.minReplicas" -}}
{{- end -}}
{{- if lt (int .Values.collector.terminationGracePeriodSeconds) (add (int .Values.collector.preStopSleepSeconds) 15) -}}
{{- fail "genai-mlflow: collector.terminationGracePeriodSeconds must be at least collector.preStopSleepSeconds + 15, or the spool gets no time to drain" -}}
{{- end -}}
{{- end -}}
