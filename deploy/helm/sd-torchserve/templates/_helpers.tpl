{{/* Names: the release name, so that a release `sd` gets sd-torchserve, sd-front; cut to leave room for the
     longest suffix within the 63 characters of a DNS label. */}}
{{- define "sd.fullname" -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{- define "sd.torchserve" -}}{{ include "sd.fullname" . }}-torchserve{{- end -}}
{{- define "sd.front" -}}{{ include "sd.fullname" . }}-front{{- end -}}

{{- define "sd.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- include "sd.fullname" . -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Labels of every object; selector labels are the stable subset a Deployment can never change. */}}
{{- define "sd.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "sd.selectorLabels" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* An image reference: repository@digest when a digest is given, else repository:tag. */}}
{{- define "sd.image" -}}
{{- if .digest -}}
{{ .repository }}@{{ .digest }}
{{- else -}}
{{ .repository }}:{{ .tag }}
{{- end -}}
{{- end -}}

{{/* Pod-level hardening shared by both Deployments: the images' non-root user, the runtime's seccomp profile. */}}
{{- define "sd.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
fsGroupChangePolicy: OnRootMismatch
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "sd.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
allowPrivilegeEscalation: false
privileged: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* A value as text: a whole number stays one. A values file reads numbers as floats, which Go's templates print
as 3.3554432e+07 from a million up: no number TorchServe or the front reads. */}}
{{- define "sd.scalar" -}}
{{- if and (kindIs "float64" .) (eq . (floor .)) -}}{{ int64 . }}{{- else -}}{{ . }}{{- end -}}
{{- end -}}

{{/* config.properties for TorchServe in a pod. Inference and metrics on every address of the pod (the Services
     and the NetworkPolicy decide who reaches them); management and gRPC on loopback, never beyond the pod. The
     rest is the repository's config.properties, whose comments explain each value (tests/test_deploy.py keeps the
     two equal). */}}
{{- define "sd.configProperties" -}}
{{- $ports := .Values.torchserve.ports -}}
{{- $config := dict
  "inference_address" (printf "http://0.0.0.0:%d" (int $ports.inference))
  "management_address" (printf "http://127.0.0.1:%d" (int $ports.management))
  "metrics_address" (printf "http://0.0.0.0:%d" (int $ports.metrics))
  "grpc_inference_address" "127.0.0.1"
  "grpc_inference_port" "7070"
  "grpc_management_address" "127.0.0.1"
  "grpc_management_port" "7071"
  "disable_token_authorization" "true"
  "enable_model_api" "false"
  "allowed_urls" "^file:///nonexistent$"
  "install_py_dep_per_model" "false"
  "enable_envvars_config" "false"
  "model_store" .Values.modelStore.path
  "load_models" (printf "%s=%s" .Values.model.name .Values.model.name)
  "decode_input_request" "false"
  "max_response_size" "41943040"
  "max_request_size" "16777216"
  "default_startup_timeout" "600"
  "default_response_timeout" "900"
  "job_queue_size" "32"
  "default_workers_per_model" "1"
  "metrics_mode" "prometheus"
  "model_metrics_auto_detect" "true"
  "vmargs" .Values.torchserve.javaOptions
-}}
{{- range $key, $value := merge (deepCopy .Values.torchserve.extraConfig) $config }}
{{ $key }}={{ include "sd.scalar" $value }}
{{- end }}
{{- end -}}
