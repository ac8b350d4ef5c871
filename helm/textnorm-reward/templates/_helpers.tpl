{{/*
Names and labels, `helm create` style.
*/}}
{{- define "textnorm-reward.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name, truncated so that "<fullname>-triton-grpc" still fits in 63 characters.
*/}}
{{- define "textnorm-reward.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 48 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 48 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 48 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "textnorm-reward.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "textnorm-reward.labels" -}}
helm.sh/chart: {{ include "textnorm-reward.chart" . }}
{{ include "textnorm-reward.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: textnorm-reward
{{- end }}

{{- define "textnorm-reward.selectorLabels" -}}
app.kubernetes.io/name: {{ include "textnorm-reward.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Per-component names and selector labels. */}}
{{- define "textnorm-reward.gateway.fullname" -}}
{{- printf "%s-gateway" (include "textnorm-reward.fullname" .) }}
{{- end }}

{{- define "textnorm-reward.triton.fullname" -}}
{{- printf "%s-triton" (include "textnorm-reward.fullname" .) }}
{{- end }}

{{/* The headless Service trainers and the gateway resolve to every Triton pod (gRPC). */}}
{{- define "textnorm-reward.triton.headlessName" -}}
{{- printf "%s-triton-grpc" (include "textnorm-reward.fullname" .) }}
{{- end }}

{{- define "textnorm-reward.gateway.selectorLabels" -}}
{{ include "textnorm-reward.selectorLabels" . }}
app.kubernetes.io/component: gateway
{{- end }}

{{- define "textnorm-reward.triton.selectorLabels" -}}
{{ include "textnorm-reward.selectorLabels" . }}
app.kubernetes.io/component: triton
{{- end }}

{{- define "textnorm-reward.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "textnorm-reward.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The export Job's account: its own hook account when the chart creates accounts and the Job is
a hook (templates/serviceaccount.yaml), else the release's.
*/}}
{{- define "textnorm-reward.exportServiceAccountName" -}}
{{- if and .Values.serviceAccount.create .Values.model.exportJob.hook }}
{{- printf "%s-export" (include "textnorm-reward.serviceAccountName" . | trunc 56 | trimSuffix "-") }}
{{- else }}
{{- include "textnorm-reward.serviceAccountName" . }}
{{- end }}
{{- end }}

{{/*
An image reference: (dict "image" .Values.images.<target> "root" $). Empty tag: appVersion.
*/}}
{{- define "textnorm-reward.image" -}}
{{- printf "%s:%s" .image.repository (.image.tag | default .root.Chart.AppVersion) }}
{{- end }}

{{/*
The image of the build-engines init container: the export image's export-gpu target (TensorRT),
tag images.export.gpuTag, else `<images.export.tag or appVersion>-gpu` (the CPU export image,
images.export.tag, has no TensorRT).
*/}}
{{- define "textnorm-reward.buildEnginesImage" -}}
{{- $image := .Values.images.export }}
{{- $cpu := $image.tag | default .Chart.AppVersion }}
{{- printf "%s:%s" $image.repository ($image.gpuTag | default (printf "%s-gpu" $cpu)) }}
{{- end }}

{{/*
Whether an API (group/version or group/version/Kind) is available: the cluster's
(.Capabilities, i.e. `helm template --api-versions`) or listed in .Values.extraApiVersions.
Call with (dict "api" "monitoring.coreos.com/v1/ServiceMonitor" "root" $); "true" or "".
*/}}
{{- define "textnorm-reward.hasApi" -}}
{{- if or (.root.Capabilities.APIVersions.Has .api) (has .api .root.Values.extraApiVersions) -}}
true
{{- end -}}
{{- end }}

{{/* -- the model repository ---------------------------------------------------------------- */}}

{{/* Folder of the repository under /models. */}}
{{- define "textnorm-reward.modelName" -}}
{{- if .Values.model.name }}
{{- .Values.model.name }}
{{- else if .Values.triton.gpu.enabled }}
{{- "shapes-clip-gpu" }}
{{- else }}
{{- "shapes-clip" }}
{{- end }}
{{- end }}

{{/* cpu | gpu: the flavour the export Job writes. */}}
{{- define "textnorm-reward.exportTarget" -}}
{{- .Values.model.exportJob.target | default (ternary "gpu" "cpu" .Values.triton.gpu.enabled) }}
{{- end }}

{{/* The PVC holding /models (source pvc or exportJob). */}}
{{- define "textnorm-reward.modelsClaimName" -}}
{{- if eq .Values.model.source "pvc" }}
{{- required "model.pvc.claimName is required with model.source=pvc" .Values.model.pvc.claimName }}
{{- else }}
{{- .Values.model.pvc.claimName | default (printf "%s-models" (include "textnorm-reward.fullname" .)) }}
{{- end }}
{{- end }}

{{/* Whether the chart creates the models claim (exportJob without an existing claim). */}}
{{- define "textnorm-reward.createModelsClaim" -}}
{{- if and (eq .Values.model.source "exportJob") (not .Values.model.pvc.claimName) -}}
true
{{- end -}}
{{- end }}

{{/* The repository the Triton container serves. */}}
{{- define "textnorm-reward.triton.repositoryPath" -}}
{{- if .Values.triton.gpu.enabled }}
{{- "/repository" }}
{{- else }}
{{- printf "/models/%s" (include "textnorm-reward.modelName" .) }}
{{- end }}
{{- end }}

{{/* Where the gateway finds provenance.json and tokenizer.json (REWARD_REPOSITORY). */}}
{{- define "textnorm-reward.gateway.repositoryPath" -}}
{{- if eq .Values.model.source "image" }}
{{- "/repository" }}
{{- else }}
{{- printf "/models/%s" (include "textnorm-reward.modelName" .) }}
{{- end }}
{{- end }}

{{/*
An initContainer that waits until the export Job has written /models/<name>/provenance.json
(the exporter moves the repository into place only when it is complete).
*/}}
{{- define "textnorm-reward.waitForRepository" -}}
- name: wait-for-repository
  image: {{ include "textnorm-reward.image" (dict "image" .Values.images.triton "root" .) }}
  imagePullPolicy: {{ .Values.images.triton.pullPolicy }}
  command:
    - sh
    - -c
    - |
      until [ -f "/models/{{ include "textnorm-reward.modelName" . }}/provenance.json" ]; do
        echo "waiting for the export Job to write /models/{{ include "textnorm-reward.modelName" . }}"
        sleep 5
      done
  securityContext:
    {{- toYaml .Values.triton.securityContext | nindent 4 }}
  resources:
    requests:
      cpu: 10m
      memory: 16Mi
    limits:
      memory: 64Mi
  volumeMounts:
    - name: models
      mountPath: /models
      readOnly: true
{{- end }}

{{/* -- the gateway ------------------------------------------------------------------------- */}}

{{/* gRPC target of Triton: every pod behind the headless Service, balanced client-side. */}}
{{- define "textnorm-reward.tritonUrl" -}}
{{- printf "dns:///%s.%s.svc.%s:8001" (include "textnorm-reward.triton.headlessName" .) .Release.Namespace .Values.clusterDomain }}
{{- end }}

{{- define "textnorm-reward.apiKeysSecretName" -}}
{{- .Values.gateway.existingSecret | default (printf "%s-api-keys" (include "textnorm-reward.fullname" .)) }}
{{- end }}

{{- define "textnorm-reward.apiKeysSecretKey" -}}
{{- if .Values.gateway.existingSecret }}
{{- .Values.gateway.existingSecretKey }}
{{- else }}
{{- "api-keys" }}
{{- end }}
{{- end }}

{{/* Fails rendering when the gateway would have no API key. */}}
{{- define "textnorm-reward.requireApiKeys" -}}
{{- if and (not .Values.gateway.existingSecret) (empty .Values.gateway.apiKeys) }}
{{- fail "gateway.apiKeys (a list of Bearer keys) or gateway.existingSecret is required: the gateway refuses to listen on a non-loopback address without an API key" }}
{{- end }}
{{- end }}

{{/* Whether prompt sets are configured, and the ConfigMap that holds them. */}}
{{- define "textnorm-reward.hasPromptSets" -}}
{{- $p := .Values.gateway.promptSets }}
{{- if or $p.existingConfigMap $p.json (not (empty $p.inline)) -}}
true
{{- end -}}
{{- end }}

{{- define "textnorm-reward.promptSetsConfigMap" -}}
{{- .Values.gateway.promptSets.existingConfigMap | default (printf "%s-prompt-sets" (include "textnorm-reward.fullname" .)) }}
{{- end }}

{{/*
A settings value as a REWARD_* environment string. Helm reads every number as float64, whose
default format is 8.388608e+06: integral numbers print as integers; lists and maps as JSON.
*/}}
{{- define "textnorm-reward.envValue" -}}
{{- if kindIs "float64" . }}
{{- if eq . (floor .) }}{{ int64 . }}{{ else }}{{ . }}{{ end }}
{{- else if or (kindIs "slice" .) (kindIs "map" .) }}
{{- toJson . }}
{{- else }}
{{- toString . }}
{{- end }}
{{- end }}

{{/* Pod disruption budget spec: (dict "pdb" .Values.<x>.pdb "what" "<x>.pdb"). */}}
{{- define "textnorm-reward.pdbSpec" -}}
{{- $min := .pdb.minAvailable }}
{{- $max := .pdb.maxUnavailable }}
{{- if and (not (kindIs "invalid" $min)) (not (kindIs "invalid" $max)) }}
{{- fail (printf "%s: set minAvailable or maxUnavailable, not both" .what) }}
{{- else if not (kindIs "invalid" $min) }}
minAvailable: {{ include "textnorm-reward.envValue" $min }}
{{- else if not (kindIs "invalid" $max) }}
maxUnavailable: {{ include "textnorm-reward.envValue" $max }}
{{- else }}
{{- fail (printf "%s: set minAvailable or maxUnavailable" .what) }}
{{- end }}
{{- end }}

{{/*
The export Job's `reward-service` arguments, as a JSON array.
*/}}
{{- define "textnorm-reward.exportArgs" -}}
{{- $job := .Values.model.exportJob }}
{{- $out := printf "/models/%s" (include "textnorm-reward.modelName" .) }}
{{- $args := list "export" "--out" $out "--target" (include "textnorm-reward.exportTarget" .) }}
{{- if $job.model }}
{{- $args = concat $args (list "--model" $job.model) }}
{{- end }}
{{- range $job.members }}
{{- $args = concat $args (list "--member" .) }}
{{- end }}
{{- $args = concat $args $job.extraArgs }}
{{- toJson $args }}
{{- end }}

{{/*
What the export Job exports (its arguments and image), hashed: it names the Job, and the pods
that serve the export carry it, so a changed export under the same model.name rolls them.
*/}}
{{- define "textnorm-reward.exportChecksum" -}}
{{- $image := include "textnorm-reward.image" (dict "image" .Values.images.export "root" .) }}
{{- toJson (list (include "textnorm-reward.exportArgs" . | fromJsonArray) $image) | sha256sum }}
{{- end }}
