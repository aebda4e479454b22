"""The remaining sections: names, auth, the policy file (its `preset` enum is the presets the
chart ships), monitoring, the helm test, network policies."""

from __future__ import annotations

from .nodes import any_of_types, array, boolean, integer, null, number, obj, one_of, ref, string
from .presets import preset_names

SECTIONS = {
    'global': obj(additional=None, description='reserved by Helm for parent charts'),
    'nameOverride': string(max_length=40),
    'fullnameOverride': string(max_length=40),
    'commonLabels': ref('stringMap'),
    'imagePullSecrets': array(obj({'name': string(min_length=1)}, required=['name'])),
    'auth': obj(
        {
            'enabled': boolean(),
            'existingSecret': string(),
            'existingSecretKey': string(pattern='^$|^[-._a-zA-Z0-9]+$'),
            'apiKeys': obj(
                pattern_properties={'^[-_a-zA-Z0-9][-._a-zA-Z0-9]*$': string(min_length=1)},
                description='secret entry name -> API key',
            ),
        },
        required=['enabled', 'existingSecret', 'apiKeys'],
    ),
    'policy': obj(
        {
            'preset': string(enum=preset_names(), description="a policy file shipped with the chart "
                             "(files/policies/<preset>.yaml, a copy of policies/presets/)"),
            'file': string(description='your own policy file (YAML text); replaces the preset when not empty'),
            'autoscaling': one_of(
                null(),
                obj(
                    {
                        'min_replicas': integer(minimum=0),
                        'initial_replicas': integer(minimum=0),
                        'max_replicas': integer(minimum=1),
                        'target_ongoing_requests': number(exclusive_minimum=0),
                        'metrics_interval_s': number(exclusive_minimum=0),
                        'look_back_period_s': number(exclusive_minimum=0),
                        'smoothing_factor': number(exclusive_minimum=0),
                        'upscale_smoothing_factor': any_of_types('number', 'null'),
                        'downscale_smoothing_factor': any_of_types('number', 'null'),
                        'upscaling_factor': any_of_types('number', 'null'),
                        'downscaling_factor': any_of_types('number', 'null'),
                        'upscale_delay_s': number(minimum=0),
                        'downscale_delay_s': number(minimum=0),
                        'downscale_to_zero_delay_s': any_of_types('number', 'null', minimum=0),
                        'aggregation_function': string(enum=['mean', 'max', 'min']),
                    },
                    description='Ray Serve AutoscalingConfig',
                ),
            ),
        },
        required=['preset', 'file'],
        description="the gateway's mode policy file (a preset or yours; docs/POLICY.md validates the inside) "
                    "and Serve's autoscaling",
    ),
    'monitoring': obj(
        {
            'prometheus': obj({'url': string(pattern='^$|^https?://')}, required=['url']),
            'serviceMonitor': obj(
                {
                    'enabled': boolean(),
                    'interval': ref('duration'),
                    'scrapeTimeout': ref('duration'),
                    'labels': ref('stringMap'),
                },
                required=['enabled'],
            ),
            'podMonitor': obj(
                {
                    'enabled': boolean(),
                    'interval': ref('duration'),
                    'scrapeTimeout': ref('duration'),
                    'labels': ref('stringMap'),
                },
                required=['enabled'],
            ),
            'prometheusRule': obj(
                {
                    'enabled': boolean(),
                    'labels': ref('stringMap'),
                    'alertLabels': ref('stringMap'),
                    'replicaDownFor': ref('duration'),
                    'errorRateThreshold': number(exclusive_minimum=0, maximum=1),
                    'queueDepthThreshold': integer(minimum=0),
                    'kvCacheUsageThreshold': number(exclusive_minimum=0, maximum=1),
                    'signalStaleFor': ref('duration'),
                },
                required=['enabled'],
            ),
            'dashboard': obj(
                {
                    'enabled': boolean(),
                    'namespace': string(),
                    'labels': ref('stringMap'),
                    'annotations': ref('stringMap'),
                },
                required=['enabled'],
            ),
        },
        required=['prometheus', 'serviceMonitor', 'podMonitor', 'dashboard', 'prometheusRule'],
    ),
    'tests': obj(
        {
            'enabled': boolean(),
            'maxTokens': integer(minimum=1, maximum=64),
            'readyTimeoutSeconds': integer(minimum=1),
        },
        required=['enabled'],
    ),
    'networkPolicy': obj(
        {
            'enabled': boolean(),
            'gatewayIngressFrom': ref('peers'),
            'metricsFrom': ref('peers'),
            'kuberayOperatorFrom': ref('peers'),
            'serveFrom': ref('peers'),
        },
        required=['enabled'],
    ),
}
