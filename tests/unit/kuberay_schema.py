"""A strict schema of the KubeRay custom resources (apiVersion ray.io/v1) our manifests use.

Written from KubeRay v1.6.0's Go types (ray-operator/apis/ray/v1/raycluster_types.go,
rayjob_types.go, rayservice_types.go) and the checks of its validation.go, for the fields of
RayCluster, RayJob and RayService specs (and the ones around them a user is likely to add). An
unknown field or a wrong type is an error: pydantic in strict mode with ``extra="forbid"``, int32
bounds where Go has ``int32``, string maps where Go has ``map[string]string``.

Embedded Kubernetes objects (pod templates, env vars, resource requirements, services) are checked
against the ``kubernetes`` client's models: each model class lists its fields (``attribute_map``:
python name -> JSON name) and their types (``openapi_types``); :func:`k8s_problems` walks a
manifest with them, and builds each model from its given fields so missing required fields fail.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import kubernetes.client
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

Int32 = Annotated[int, Field(ge=-(2**31), le=2**31 - 1)]
NonNegativeInt32 = Annotated[int, Field(ge=0, le=2**31 - 1)]
StringMap = dict[str, str]
PRIMITIVES = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,), "datetime": (str,),
              "date": (str,), "object": (str, int, float, bool, dict, list)}
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def k8s_problems(value: Any, type_name: str, path: str = "") -> list[str]:
    """What is wrong with ``value`` as the Kubernetes type ``type_name`` (a client type string:
    "V1PodTemplateSpec", "list[V1EnvVar]", "dict[str, str]", "int", ...)."""
    if type_name.startswith("list["):
        if not isinstance(value, list):
            return [f"{path}: expected a list, got {type(value).__name__}"]
        return [p for i, item in enumerate(value) for p in k8s_problems(item, type_name[5:-1], f"{path}[{i}]")]
    if type_name.startswith("dict["):
        if not isinstance(value, dict):
            return [f"{path}: expected a mapping, got {type(value).__name__}"]
        _, item_type = type_name[5:-1].split(", ", 1)
        return [p for key, item in value.items() for p in k8s_problems(item, item_type, f"{path}.{key}")]
    if type_name in PRIMITIVES:
        if isinstance(value, bool) and type_name in ("int", "float"):
            return [f"{path}: expected {type_name}, got bool"]
        if not isinstance(value, PRIMITIVES[type_name]):
            return [f"{path}: expected {type_name}, got {type(value).__name__} {value!r}"]
        return []
    return _model_problems(value, type_name, path)


def _model_problems(value: Any, type_name: str, path: str) -> list[str]:
    model = getattr(kubernetes.client, type_name)
    if not isinstance(value, dict):
        return [f"{path}: expected a {type_name} mapping, got {type(value).__name__}"]
    python_names = {json_name: name for name, json_name in model.attribute_map.items()}
    problems = []
    for key, item in value.items():
        if key not in python_names:
            problems.append(f"{path}.{key}: unknown field of {type_name}")
        else:
            problems += k8s_problems(item, model.openapi_types[python_names[key]], f"{path}.{key}")
    try:  # the client's models refuse a missing required field
        model(**{python_names[key]: item for key, item in value.items() if key in python_names})
    except ValueError as error:
        problems.append(f"{path}: {type_name}: {error}")
    return problems


def k8s(type_name: str) -> AfterValidator:
    def check(value: Any) -> Any:
        problems = k8s_problems(value, type_name)
        if problems:
            raise ValueError("; ".join(problems))
        return value

    return AfterValidator(check)


PodTemplateSpec = Annotated[dict[str, Any], k8s("V1PodTemplateSpec")]
ResourceRequirements = Annotated[dict[str, Any], k8s("V1ResourceRequirements")]
EnvVars = Annotated[list[dict[str, Any]], k8s("list[V1EnvVar]")]
EnvFromSources = Annotated[list[dict[str, Any]], k8s("list[V1EnvFromSource]")]
VolumeMounts = Annotated[list[dict[str, Any]], k8s("list[V1VolumeMount]")]
SecurityContext = Annotated[dict[str, Any], k8s("V1SecurityContext")]
Service = Annotated[dict[str, Any], k8s("V1Service")]
ObjectMeta = Annotated[dict[str, Any], k8s("V1ObjectMeta")]
PullPolicy = Literal["Always", "IfNotPresent", "Never"]
ManagedBy = Literal["ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue"]


class CR(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class AuthOptions(CR):
    mode: Literal["disabled", "token"] | None = None
    secretName: str | None = None
    enableK8sTokenAuth: bool | None = None


class AutoscalerOptions(CR):
    resources: ResourceRequirements | None = None
    image: str | None = None
    imagePullPolicy: PullPolicy | None = None
    securityContext: SecurityContext | None = None
    idleTimeoutSeconds: NonNegativeInt32 | None = None
    upscalingMode: Literal["Default", "Aggressive", "Conservative"] | None = None
    version: Literal["v1", "v2"] | None = None
    env: EnvVars | None = None
    envFrom: EnvFromSources | None = None
    volumeMounts: VolumeMounts | None = None


class HeadGroupSpec(CR):
    template: PodTemplateSpec
    headService: Service | None = None
    enableIngress: bool | None = None
    resources: StringMap | None = None
    labels: StringMap | None = None
    rayStartParams: StringMap | None = None
    serviceType: Literal["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"] | None = None


class ScaleStrategy(CR):
    workersToDelete: list[str] | None = None


class WorkerGroupSpec(CR):
    suspend: bool | None = None
    groupName: str
    replicas: NonNegativeInt32 | None = None
    minReplicas: NonNegativeInt32 | None = None
    maxReplicas: NonNegativeInt32 | None = None
    idleTimeoutSeconds: NonNegativeInt32 | None = None
    resources: StringMap | None = None
    labels: StringMap | None = None
    rayStartParams: StringMap | None = None
    template: PodTemplateSpec
    scaleStrategy: ScaleStrategy | None = None
    numOfHosts: Int32 | None = None

    @model_validator(mode="after")
    def _replicas_in_range(self) -> "WorkerGroupSpec":
        low, high = self.minReplicas or 0, self.maxReplicas if self.maxReplicas is not None else 2**31 - 1
        if low > high:
            raise ValueError(f"worker group {self.groupName}: minReplicas {low} > maxReplicas {high}")
        if self.replicas is not None and not low <= self.replicas <= high:
            raise ValueError(f"worker group {self.groupName}: replicas {self.replicas} outside [{low}, {high}]")
        return self


class RayClusterSpec(CR):
    upgradeStrategy: dict[str, Literal["Recreate", "None"]] | None = None
    authOptions: AuthOptions | None = None
    suspend: bool | None = None
    managedBy: ManagedBy | None = None
    autoscalerOptions: AutoscalerOptions | None = None
    headServiceAnnotations: StringMap | None = None
    enableInTreeAutoscaling: bool | None = None
    headGroupSpec: HeadGroupSpec
    rayVersion: str | None = None
    workerGroupSpecs: list[WorkerGroupSpec] | None = None

    @model_validator(mode="after")
    def _kuberay_checks(self) -> "RayClusterSpec":
        names = [group.groupName for group in self.workerGroupSpecs or []]
        if len(names) != len(set(names)):
            raise ValueError(f"workerGroupSpecs: duplicate groupName in {names}")
        if self.authOptions and self.authOptions.mode == "token":
            parts = tuple(int(p) for p in re.findall(r"\d+", self.rayVersion or "")[:3])
            if parts < (2, 52, 0):  # KubeRay refuses token auth below Ray 2.52.0
                raise ValueError(f"authOptions.mode token needs rayVersion >= 2.52.0, got {self.rayVersion!r}")
        return self


class DeletionCondition(CR):
    jobStatus: Literal["SUCCEEDED", "FAILED"] | None = None
    jobDeploymentStatus: Literal["Failed"] | None = None
    ttlSeconds: NonNegativeInt32 | None = None

    @model_validator(mode="after")
    def _exactly_one_status(self) -> "DeletionCondition":
        if (self.jobStatus is None) == (self.jobDeploymentStatus is None):
            raise ValueError("condition: exactly one of jobStatus and jobDeploymentStatus")
        return self


DeletionPolicyType = Literal["DeleteCluster", "DeleteWorkers", "DeleteSelf", "DeleteNone"]


class DeletionRule(CR):
    policy: DeletionPolicyType
    condition: DeletionCondition


class DeletionPolicy(CR):
    policy: DeletionPolicyType | None = None


class DeletionStrategy(CR):
    onSuccess: DeletionPolicy | None = None
    onFailure: DeletionPolicy | None = None
    deletionRules: list[DeletionRule] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one_style(self) -> "DeletionStrategy":
        legacy = self.onSuccess is not None or self.onFailure is not None
        if legacy and self.deletionRules:
            raise ValueError("deletionStrategy: onSuccess/onFailure and deletionRules cannot be used together")
        if not self.deletionRules and (self.onSuccess is None or self.onFailure is None):
            raise ValueError("deletionStrategy: needs both onSuccess and onFailure, or deletionRules")
        return self


class SubmitterConfig(CR):
    backoffLimit: Int32 | None = None


DELETION_ORDER = ("DeleteWorkers", "DeleteCluster", "DeleteSelf")  # TTLs must not decrease along it


class RayJobSpec(CR):
    activeDeadlineSeconds: Annotated[int, Field(ge=1, le=2**31 - 1)] | None = None
    backoffLimit: NonNegativeInt32 | None = None
    rayClusterSpec: RayClusterSpec | None = None
    submitterPodTemplate: PodTemplateSpec | None = None
    metadata: StringMap | None = None
    clusterSelector: StringMap | None = None
    submitterConfig: SubmitterConfig | None = None
    managedBy: ManagedBy | None = None
    deletionStrategy: DeletionStrategy | None = None
    entrypoint: str | None = None
    runtimeEnvYAML: str | None = None
    jobId: str | None = None
    submissionMode: Literal["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"] | None = None
    entrypointResources: str | None = None
    entrypointNumCpus: float | None = None
    entrypointNumGpus: float | None = None
    ttlSecondsAfterFinished: NonNegativeInt32 | None = None
    preRunningDeadlineSeconds: Annotated[int, Field(ge=1, le=2**31 - 1)] | None = None
    shutdownAfterJobFinishes: bool | None = None
    suspend: bool | None = None

    @model_validator(mode="after")
    def _kuberay_checks(self) -> "RayJobSpec":
        if (self.ttlSecondsAfterFinished or 0) > 0 and not self.shutdownAfterJobFinishes:
            raise ValueError("ttlSecondsAfterFinished needs shutdownAfterJobFinishes: true")
        rules = self.deletionStrategy.deletionRules if self.deletionStrategy else None
        if rules and self.shutdownAfterJobFinishes:
            raise ValueError("shutdownAfterJobFinishes and deletionStrategy.deletionRules are mutually exclusive")
        autoscaling = bool(self.rayClusterSpec and self.rayClusterSpec.enableInTreeAutoscaling)
        ttls: dict[tuple[str, str], dict[str, int]] = {}
        for rule in rules or []:
            condition = rule.condition
            key = ("jobStatus", condition.jobStatus) if condition.jobStatus else (
                "jobDeploymentStatus", condition.jobDeploymentStatus)
            if rule.policy == "DeleteWorkers" and autoscaling:
                raise ValueError("deletionRules: DeleteWorkers is not supported with autoscaling")
            if rule.policy in ttls.setdefault(key, {}):
                raise ValueError(f"deletionRules: duplicate rule {rule.policy} for {key}")
            ttls[key][rule.policy] = condition.ttlSeconds or 0
        for key, by_policy in ttls.items():
            ordered = [by_policy[p] for p in DELETION_ORDER if p in by_policy]
            if ordered != sorted(ordered):
                raise ValueError(f"deletionRules for {key}: TTLs must follow DeleteWorkers <= DeleteCluster <= "
                                 f"DeleteSelf, got {by_policy}")
        return self


class ClusterUpgradeOptions(CR):
    maxSurgePercent: Int32 | None = None
    stepSizePercent: Int32
    intervalSeconds: Int32
    gatewayClassName: str


class RayServiceUpgradeStrategy(CR):
    type: Literal["NewCluster", "NewClusterWithIncrementalUpgrade", "None"] | None = None
    clusterUpgradeOptions: ClusterUpgradeOptions | None = None


class RayServiceSpec(CR):
    rayClusterDeletionDelaySeconds: NonNegativeInt32 | None = None
    serveService: Service | None = None
    upgradeStrategy: RayServiceUpgradeStrategy | None = None
    managedBy: ManagedBy | None = None
    serveConfigV2: str | None = None
    rayClusterConfig: RayClusterSpec
    excludeHeadPodFromServeSvc: bool | None = None
    suspend: bool | None = None


class _Resource(CR):
    apiVersion: Literal["ray.io/v1"]
    metadata: ObjectMeta

    @model_validator(mode="after")
    def _name(self) -> "_Resource":
        name, limit = self.metadata.get("name", ""), 53 if self.kind == "RayCluster" else 47
        if not DNS_1035.match(name) or len(name) > limit:
            raise ValueError(f"metadata.name: {name!r} must be a DNS-1035 label of <= {limit} characters")
        return self


class RayCluster(_Resource):
    kind: Literal["RayCluster"]
    spec: RayClusterSpec


class RayJob(_Resource):
    kind: Literal["RayJob"]
    spec: RayJobSpec


class RayService(_Resource):
    kind: Literal["RayService"]
    spec: RayServiceSpec


RESOURCES = {"RayCluster": RayCluster, "RayJob": RayJob, "RayService": RayService}


def check_manifest(document: dict[str, Any]) -> BaseModel:
    """The manifest validated as its kind; raises pydantic's ValidationError naming the field."""
    kind = document.get("kind")
    if kind not in RESOURCES:
        raise ValueError(f"kind: {kind!r} is not one of {sorted(RESOURCES)}")
    return RESOURCES[kind].model_validate(document)
