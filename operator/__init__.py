"""afc.operator: the kopf operator reconciling AdaptiveConsumer resources.

- `crd`: the API's pydantic models (embedding the runtime's configuration sections), its
  rules (CEL and pydantic from one definition) and the generated CRD;
- `render`: pure functions from a spec to the ConfigMap, Service, StatefulSet and PDB;
- `status`: pure functions for conditions, rollout progress and retry backoff;
- `kafka`: lag arithmetic, and the bounded admin calls that feed it;
- `kube`: a small async facade over the Kubernetes API (get, server-side apply, status);
- `reconcile`: the reconcile and the kopf handlers that trigger it;
- `settings`, `cli`: `afc-operator`;
- `testing`: run the operator and play the kubelet in tests.
"""
