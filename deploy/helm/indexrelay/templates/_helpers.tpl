{{/*
Helpers. The chart keeps to a small subset of Helm's template language (define/include,
if/else/with/range, variables, and the functions listed in docs/deploy.md) so that
the CI renderer (deploy/helm/tools) reproduces Helm exactly.
*/}}

{{- define "indexrelay.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-wide name prefix (at most 63 characters). */}}
{{- define "indexrelay.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Prefix of component names, cut to 40 characters: a StatefulSet name must stay under 52
(its pods get a controller-revision-hash label of name + 11 characters) and pod names
("<prefix>-worker-<pipeline>-<ordinal>") are DNS labels of at most 63.
*/}}
{{- define "indexrelay.base" -}}
{{- include "indexrelay.fullname" . | trunc 40 | trimSuffix "-" }}
{{- end }}

{{- define "indexrelay.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "indexrelay.selectorLabels" -}}
app.kubernetes.io/name: {{ include "indexrelay.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "indexrelay.labels" -}}
helm.sh/chart: {{ include "indexrelay.chart" . }}
{{ include "indexrelay.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Names of a pipeline's parts; argument: dict "root" $ "pipeline" <index>. */}}
{{- define "indexrelay.workerName" -}}
{{- printf "%s-worker-%d" (include "indexrelay.base" .root) .pipeline }}
{{- end }}

{{- define "indexrelay.coordinatorName" -}}
{{- printf "%s-coordinator-%d" (include "indexrelay.base" .root) .pipeline }}
{{- end }}

{{- define "indexrelay.etcdName" -}}
{{- printf "%s-etcd" (include "indexrelay.base" .) }}
{{- end }}

{{/* etcd client URLs, comma-separated (the form --etcd takes). */}}
{{- define "indexrelay.etcdEndpoints" -}}
{{- if .Values.etcd.enabled }}
{{- $name := include "indexrelay.etcdName" . }}
{{- $urls := list }}
{{- range $i := until (int .Values.etcd.replicas) }}
{{- $urls = append $urls (printf "http://%s-%d.%s.%s.svc.%s:2379" $name $i $name $.Release.Namespace $.Values.clusterDomain) }}
{{- end }}
{{- join "," $urls }}
{{- else }}
{{- join "," .Values.etcd.external.endpoints }}
{{- end }}
{{- end }}

{{/* A pipeline's key prefix in etcd; argument: dict "root" $ "pipeline" <index>. */}}
{{- define "indexrelay.etcdPrefix" -}}
{{- $base := .root.Values.etcd.prefix | default (printf "/indexrelay/%s" (include "indexrelay.fullname" .root)) }}
{{- printf "%s/p%d" (trimSuffix "/" $base) .pipeline }}
{{- end }}

{{/* image reference; argument: dict "image" <values.image> "root" $. */}}
{{- define "indexrelay.image" -}}
{{- printf "%s:%s" .image.repository (.image.tag | default .root.Chart.AppVersion) }}
{{- end }}

{{/* Environment shared by coordinators and workers. */}}
{{- define "indexrelay.commonEnv" -}}
- name: RUST_LOG
  value: {{ .Values.logLevel | quote }}
{{- with .Values.tracing.otlpEndpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ . | quote }}
{{- end }}
{{- end }}

{{/* Model flags shared by coordinators and workers. */}}
{{- define "indexrelay.modelArgs" -}}
{{- if ne .Values.model.source "embedded" }}
- --model
- {{ .Values.model.mountPath | quote }}
{{- end }}
{{- with .Values.model.indexPattern }}
- --index-pattern
- {{ . | quote }}
{{- end }}
{{- end }}

{{/* The model volume (not rendered for the embedded model). */}}
{{- define "indexrelay.modelVolume" -}}
{{- $m := .Values.model -}}
- name: model
{{- if eq $m.source "hostPath" }}
  hostPath:
    path: {{ $m.hostPath.path | quote }}
    type: Directory
{{- else if eq $m.source "pvc" }}
  persistentVolumeClaim:
    claimName: {{ $m.pvc.claimName | quote }}
    readOnly: true
{{- else if $m.download.sizeLimit }}
  emptyDir:
    sizeLimit: {{ $m.download.sizeLimit | quote }}
{{- else }}
  emptyDir: {}
{{- end }}
{{- end }}

{{/* The model mount of the main container. */}}
{{- define "indexrelay.modelMount" -}}
- name: model
  mountPath: {{ .Values.model.mountPath | quote }}
  readOnly: true
{{- if and .Values.model.subPath (ne .Values.model.source "download") }}
  subPath: {{ .Values.model.subPath | quote }}
{{- end }}
{{- end }}

{{/*
Init container that downloads the model (source: download); argument:
dict "root" $ "skipWeights" <bool>. Coordinators only read config.json, the tokenizer
files and the chat template, so they skip weight files.
*/}}
{{- define "indexrelay.modelDownload" -}}
{{- $m := .root.Values.model -}}
- name: fetch-model
  image: {{ printf "%s:%s" $m.download.image.repository $m.download.image.tag | quote }}
  imagePullPolicy: {{ $m.download.image.pullPolicy }}
  command:
    - sh
    - -c
    - |
      set -eu
      cd "$MODEL_DIR"
      for u in "$@"; do
        f="${u%%\?*}"
        f="${f##*/}"
        case "$f" in
          *.safetensors|*.bin|*.pt|*.pth)
            if [ "$SKIP_WEIGHTS" = true ]; then echo "skipping $f"; continue; fi ;;
        esac
        echo "fetching $f"
        curl -fL --retry 5 --retry-delay 5 -o "$f.part" "$u"
        mv "$f.part" "$f"
      done
    - fetch-model
  args:
    {{- range $m.download.urls }}
    - {{ . | quote }}
    {{- end }}
  env:
    - name: MODEL_DIR
      value: {{ $m.mountPath | quote }}
    - name: SKIP_WEIGHTS
      value: {{ .skipWeights | quote }}
  securityContext:
    {{- toYaml .root.Values.securityContext | nindent 4 }}
  volumeMounts:
    - name: model
      mountPath: {{ $m.mountPath | quote }}
{{- end }}

{{/* Checks across values that values.schema.json cannot express. */}}
{{- define "indexrelay.validate" -}}
{{- $split := .Values.pipeline.split }}
{{- if and $split (ne (len $split) (sub (int .Values.pipeline.stages) 1)) }}
{{- fail (printf "pipeline.split has %d boundaries, so pipeline.stages must be %d (got %d)" (len $split) (add (len $split) 1) (int .Values.pipeline.stages)) }}
{{- end }}
{{- if eq (int .Values.coordinator.grpcPort) (int .Values.coordinator.httpPort) }}
{{- fail "coordinator.grpcPort and coordinator.httpPort must differ" }}
{{- end }}
{{- if and (gt (int .Values.workers.gpu.count) 0) .Values.workers.resources.limits }}
{{- if hasKey .Values.workers.resources.limits .Values.workers.gpu.resourceName }}
{{- fail (printf "set the GPU count in workers.gpu.count, not in workers.resources.limits[%q]" .Values.workers.gpu.resourceName) }}
{{- end }}
{{- end }}
{{- end }}
