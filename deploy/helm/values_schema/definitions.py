"""Shared node types of the values schema (`definitions`): Kubernetes shapes the chart reuses."""

from __future__ import annotations

from .nodes import any_of_types, array, boolean, enum, integer, null, number, obj, one_of, ref, string

DEFINITIONS = {
    'quantity': one_of(
        string(pattern='^[+]?[0-9.]+([eE][-+]?[0-9]+)?(m|k|Ki|Mi|Gi|Ti|Pi|Ei|M|G|T|P|E)?$'),
        number(minimum=0),
        description='a Kubernetes resource quantity',
    ),
    'resources': obj(
        {
            'requests': obj(additional=ref('quantity')),
            'limits': obj(additional=ref('quantity')),
            'claims': array(obj(additional=None)),
        },
    ),
    'image': obj(
        {
            'registry': string(pattern='^$|^[a-z0-9]([-a-z0-9.]*[a-z0-9])?(:[0-9]+)?(/[-a-z0-9._]+)*$'),
            'repository': string(min_length=1),
            'tag': string(),
            'digest': string(pattern='^$|^sha256:[a-f0-9]{64}$'),
            'pullPolicy': string(enum=['Always', 'IfNotPresent', 'Never']),
        },
        required=['repository', 'tag', 'digest', 'pullPolicy'],
    ),
    'stringMap': obj(additional=string()),
    'envList': array(obj({'name': string(min_length=1)}, required=['name'], additional=None)),
    'serviceAccount': obj({'create': boolean(), 'name': string(), 'annotations': ref('stringMap')},
                          required=['create', 'name']),
    'podSecurityContext': obj(additional=None),
    'securityContext': obj(additional=None),
    'probe': obj(
        {
            'initialDelaySeconds': integer(minimum=0),
            'periodSeconds': integer(minimum=1),
            'timeoutSeconds': integer(minimum=1),
            'failureThreshold': integer(minimum=1),
            'successThreshold': integer(minimum=1),
        },
    ),
    'peers': array(
        obj(
            {
                'podSelector': obj(additional=None),
                'namespaceSelector': obj(additional=None),
                'ipBlock': obj(additional=None),
            },
        ),
    ),
    'rayStartParams': obj(additional=any_of_types('string', 'number', 'boolean')),
    'nullablePositiveInt': one_of(null(), integer(minimum=1)),
    'duration': string(pattern='^([0-9]+(ms|s|m|h))+$'),
    'envFromList': array(obj({'prefix': string(), 'configMapRef': obj(additional=None),
                              'secretRef': obj(additional=None)})),
    'volumeList': array(obj({'name': string(min_length=1)}, required=['name'], additional=None)),
    'volumeMountList': array(
        obj(
            {'name': string(min_length=1), 'mountPath': string(pattern='^/')},
            required=['name', 'mountPath'],
            additional=None,
        ),
    ),
    'containerList': array(
        obj(
            {'name': string(min_length=1), 'image': string(min_length=1)},
            required=['name', 'image'],
            additional=None,
        ),
    ),
    'topologySpread': array(
        obj(
            {
                'maxSkew': integer(minimum=1),
                'topologyKey': string(min_length=1),
                'whenUnsatisfiable': enum('DoNotSchedule', 'ScheduleAnyway'),
            },
            required=['maxSkew', 'topologyKey', 'whenUnsatisfiable'],
            additional=None,
        ),
    ),
    'dnsName': string(pattern='^$|^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$', max_length=253),
    'nullableGrace': one_of(null(), integer(minimum=0)),
    'pdb': obj(
        {
            'enabled': boolean(),
            'maxUnavailable': one_of(integer(minimum=1), string(pattern='^[0-9]+%$')),
            'unhealthyPodEvictionPolicy': enum('AlwaysAllow', 'IfHealthyBudget'),
        },
        required=['enabled', 'unhealthyPodEvictionPolicy'],
    ),
}
