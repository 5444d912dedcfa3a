"""What LeptonJob and LeptonModel share: spec fields, status, the API client, the reconcile loop, object helpers."""
