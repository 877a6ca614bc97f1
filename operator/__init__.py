"""afc.operator: the kopf operator reconciling AdaptiveConsumer resources."""
