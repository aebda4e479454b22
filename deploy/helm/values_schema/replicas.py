"""The `replicas` section: the RayService (Serve, head, workers, autoscaler, upgrades). `engine` is
`replicas.config.EngineLimits` itself and `serve.device` / `serve.dtype` are `ReplicaConfig`'s, so
the chart accepts what the replica validates."""

from __future__ import annotations

from replicas.config import EngineLimits, ReplicaConfig

from .nodes import array, boolean, enum, from_model, integer, literal_values, number, obj, ref, string


def ray_pod_fields() -> dict:
    """What the head and the worker group's pods both take."""
    return {
        'rayStartParams': ref('rayStartParams'),
        'resources': ref('resources'),
        'nodeSelector': ref('stringMap'),
        'tolerations': array(obj(additional=None)),
        'affinity': obj(additional=None),
        'topologySpreadConstraints': ref('topologySpread'),
        'runtimeClassName': ref('dnsName'),
        'priorityClassName': ref('dnsName'),
        'terminationGracePeriodSeconds': ref('nullableGrace'),
        'extraVolumes': ref('volumeList'),
        'extraVolumeMounts': ref('volumeMountList'),
        'extraContainers': ref('containerList'),
        'podLabels': ref('stringMap'),
        'podAnnotations': ref('stringMap'),
    }


REPLICAS = obj(
    {
        'image': ref('image'),
        'rayVersion': string(pattern='^[0-9]+\\.[0-9]+\\.[0-9]+'),
        'serve': obj(
            {
                'applicationName': string(min_length=1),
                'importPath': string(pattern='^[A-Za-z_][\\w.]*[:.][A-Za-z_]\\w*$'),
                'deploymentName': string(min_length=1),
                'port': integer(minimum=1, maximum=65535),
                'numReplicas': ref('nullablePositiveInt'),
                'maxOngoingRequests': integer(minimum=1),
                'numGpus': number(minimum=0),
                'numCpus': number(minimum=0),
                'healthCheckPeriodS': number(exclusive_minimum=0),
                'healthCheckTimeoutS': number(exclusive_minimum=0),
                'gracefulShutdownTimeoutS': number(minimum=0),
                'device': string(enum=literal_values(ReplicaConfig, 'device')),
                'dtype': string(enum=literal_values(ReplicaConfig, 'dtype')),
                'maxPromptTokens': ref('nullablePositiveInt'),
                'torchThreads': ref('nullablePositiveInt'),
                'ingress': string(enum=['haproxy', 'proxy']),
                'haproxy': obj(
                    {
                        'statsPort': integer(minimum=1, maximum=65535),
                        'metricsPort': integer(minimum=1, maximum=65535),
                        'drainSeconds': number(minimum=0),
                        'threads': integer(minimum=1),
                        'replicaPortMin': integer(minimum=1, maximum=65535),
                        'replicaPortMax': integer(minimum=1, maximum=65535),
                    },
                    required=['statsPort', 'metricsPort', 'drainSeconds', 'threads', 'replicaPortMin',
                              'replicaPortMax'],
                ),
            },
            required=['applicationName', 'importPath', 'deploymentName', 'port', 'maxOngoingRequests', 'numGpus',
                      'numCpus', 'device', 'dtype', 'ingress'],
        ),
        'engine': from_model(EngineLimits, description="replicas.config.EngineLimits"),
        'env': ref('envList'),
        'metricsReportIntervalMs': integer(minimum=100),
        'metricsPort': integer(minimum=1, maximum=65535),
        'shmSize': ref('quantity'),
        'tmpSize': ref('quantity'),
        'podSecurityContext': ref('podSecurityContext'),
        'securityContext': ref('securityContext'),
        'serviceAccount': ref('serviceAccount'),
        'head': obj(ray_pod_fields(), required=['resources']),
        'workers': obj(
            {
                **ray_pod_fields(),
                'groupName': string(pattern='^[a-z0-9]([-a-z0-9]*[a-z0-9])?$', max_length=63),
                'replicas': integer(minimum=0),
                'minReplicas': integer(minimum=0),
                'maxReplicas': integer(minimum=1),
                'gpusPerWorker': integer(minimum=0),
                'gpuResourceName': string(min_length=1),
                'podDisruptionBudget': ref('pdb'),
            },
            required=['groupName', 'replicas', 'minReplicas', 'maxReplicas', 'gpusPerWorker', 'gpuResourceName',
                      'resources'],
        ),
        'autoscaler': obj(
            {
                'enabled': boolean(),
                'idleTimeoutSeconds': integer(minimum=0),
                'upscalingMode': string(enum=['Default', 'Conservative', 'Aggressive']),
                'resources': ref('resources'),
                'securityContext': ref('securityContext'),
            },
            required=['enabled'],
        ),
        'clusterDeletionDelaySeconds': integer(minimum=0),
        'excludeHeadPodFromServeSvc': boolean(),
        'envFrom': ref('envFromList'),
        'upgradeStrategy': obj(
            {
                'type': enum('NewCluster', 'NewClusterWithIncrementalUpgrade', 'None'),
                'clusterUpgradeOptions': obj(
                    {
                        'gatewayClassName': string(),
                        'maxSurgePercent': integer(minimum=1, maximum=100),
                        'stepSizePercent': integer(minimum=1, maximum=100),
                        'intervalSeconds': integer(minimum=1),
                    },
                    required=['gatewayClassName', 'maxSurgePercent', 'stepSizePercent', 'intervalSeconds'],
                ),
            },
            required=['type', 'clusterUpgradeOptions'],
        ),
        'gcsFaultTolerance': obj(
            {
                'enabled': boolean(),
                'redisAddress': string(pattern='^$|^(redis://|rediss://)?[^\\s:/]+:[0-9]+$'),
                'redisPasswordSecret': obj({'name': string(), 'key': string(min_length=1)}, required=['name', 'key']),
                'externalStorageNamespace': string(),
            },
            required=['enabled', 'redisAddress', 'redisPasswordSecret'],
        ),
        'rayAuth': obj({'enabled': boolean(), 'secretName': string()}, required=['enabled', 'secretName']),
    },
    required=['image', 'rayVersion', 'serve', 'engine', 'head', 'workers', 'autoscaler', 'upgradeStrategy',
              'gcsFaultTolerance', 'rayAuth'],
)
