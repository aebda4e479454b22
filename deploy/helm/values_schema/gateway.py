"""The `gateway` section: the gateway Deployment, Service, Ingress, autoscaling; `policy.fixedMode`
takes its modes from `replicas.wire.MODES`."""

from __future__ import annotations

from replicas.wire import MODES

from .nodes import array, boolean, integer, number, obj, ref, shape, string, when

GATEWAY = obj(
    {
        'image': ref('image'),
        'replicaCount': integer(minimum=1),
        'port': integer(minimum=1, maximum=65535),
        'replicaUrl': string(pattern='^$|^https?://'),
        'replicaRouting': string(enum=['direct', 'ingress']),
        'streamChannels': boolean(),
        'packAr': integer(minimum=0),
        'policy': obj(
            {'source': string(enum=['fixed', 'file']), 'fixedMode': string(enum=MODES)},
            required=['source', 'fixedMode'],
        ),
        'extraArgs': array(string()),
        'env': ref('envList'),
        'resources': ref('resources'),
        'podSecurityContext': ref('podSecurityContext'),
        'securityContext': ref('securityContext'),
        'livenessProbe': ref('probe'),
        'readinessProbe': ref('probe'),
        'terminationGracePeriodSeconds': integer(minimum=0),
        'nodeSelector': ref('stringMap'),
        'tolerations': array(obj(additional=None)),
        'affinity': obj(additional=None),
        'topologySpreadConstraints': array(obj(additional=None)),
        'podLabels': ref('stringMap'),
        'podAnnotations': ref('stringMap'),
        'serviceAccount': ref('serviceAccount'),
        'service': obj(
            {
                'type': string(enum=['ClusterIP', 'NodePort', 'LoadBalancer']),
                'port': integer(minimum=1, maximum=65535),
                'annotations': ref('stringMap'),
            },
            required=['type', 'port'],
        ),
        'ingress': obj(
            {
                'enabled': boolean(),
                'className': string(),
                'annotations': ref('stringMap'),
                'hosts': array(
                    obj(
                        {
                            'host': string(),
                            'paths': array(
                                obj(
                                    {
                                        'path': string(pattern='^/'),
                                        'pathType': string(enum=['Prefix', 'Exact', 'ImplementationSpecific']),
                                    },
                                    required=['path', 'pathType'],
                                ),
                                min_items=1,
                            ),
                        },
                        required=['paths'],
                    ),
                ),
                'tls': array(obj({'secretName': string(), 'hosts': array(string())})),
            },
            required=['enabled'],
            all_of=[
                when(
                    shape(properties={'enabled': shape(const=True)}),
                    shape(properties={'hosts': shape(min_items=1)}, required=['hosts']),
                ),
            ],
        ),
        'autoscaling': obj(
            {
                'enabled': boolean(),
                'minReplicas': integer(minimum=1),
                'maxReplicas': integer(minimum=1),
                'targetCPUUtilizationPercentage': integer(minimum=1, maximum=100),
            },
            required=['enabled'],
        ),
        'podDisruptionBudget': ref('pdb'),
        'metricsPort': integer(minimum=1, maximum=65535),
        'keyReloadIntervalSeconds': number(exclusive_minimum=0),
        'envFrom': ref('envFromList'),
        'priorityClassName': ref('dnsName'),
        'runtimeClassName': ref('dnsName'),
        'extraVolumes': ref('volumeList'),
        'extraVolumeMounts': ref('volumeMountList'),
        'extraContainers': ref('containerList'),
    },
    required=['image', 'port', 'resources', 'service', 'ingress', 'autoscaling', 'podDisruptionBudget',
              'serviceAccount', 'policy', 'metricsPort', 'keyReloadIntervalSeconds', 'replicaRouting',
              'streamChannels', 'packAr'],
)
