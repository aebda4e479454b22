"""The `model` section of the values schema: where the weights come from (a PVC or a download)."""

from __future__ import annotations

from .nodes import array, boolean, enum, integer, obj, ref, shape, string, when

MODEL = obj(
    {
        'name': string(min_length=1),
        'source': string(enum=['pvc', 'download']),
        'mountPath': string(pattern='^/'),
        'subPath': string(pattern='^[^.][^\\s]*$|^$'),
        'mountOnHead': boolean(),
        'lora': obj({'enabled': boolean(), 'subfolder': string()}, required=['enabled', 'subfolder']),
        'pvc': obj({'claimName': string()}, required=['claimName']),
        'download': obj(
            {
                'repo': string(min_length=1),
                'revision': string(min_length=1),
                'allowPatterns': array(string(min_length=1)),
                'tokenSecret': obj({'name': string(), 'key': string(min_length=1)}, required=['name', 'key']),
                'endpoint': string(pattern='^$|^https?://'),
                'proxy': obj(
                    {'http': string(), 'https': string(), 'noProxy': string()},
                    required=['http', 'https', 'noProxy'],
                ),
                'env': ref('envList'),
                'storage': string(enum=['shared', 'perPod']),
                'pvc': obj(
                    {
                        'existingClaim': string(),
                        'size': ref('quantity'),
                        'storageClassName': string(),
                        'accessModes': array(
                            enum('ReadWriteMany', 'ReadOnlyMany', 'ReadWriteOnce', 'ReadWriteOncePod'),
                            min_items=1,
                        ),
                        'keep': boolean(),
                    },
                    required=['existingClaim', 'size', 'accessModes', 'keep'],
                ),
                'perPod': obj({'sizeLimit': ref('quantity')}, required=['sizeLimit']),
                'job': obj(
                    {
                        'backoffLimit': integer(minimum=0),
                        'activeDeadlineSeconds': integer(minimum=60),
                        'nodeSelector': ref('stringMap'),
                        'tolerations': array(obj(additional=None)),
                        'waitPollSeconds': integer(minimum=1),
                    },
                    required=['backoffLimit', 'activeDeadlineSeconds', 'waitPollSeconds'],
                ),
                'resources': ref('resources'),
            },
            required=['repo', 'revision', 'tokenSecret', 'storage', 'pvc', 'perPod', 'job', 'proxy'],
        ),
    },
    required=['name', 'source', 'mountPath', 'subPath', 'lora', 'pvc', 'download'],
    all_of=[
        when(
            shape(properties={'source': shape(const='pvc')}),
            shape(properties={'pvc': shape(properties={'claimName': string(min_length=1)})}),
        ),
    ],
)
