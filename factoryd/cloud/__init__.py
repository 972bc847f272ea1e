"""From the line to the customer's cloud: the formats clouds ingest, and direct registration.

- :mod:`~factoryd.cloud.exports`: the lot's provisioned devices as CSV, AWS bulk-registration JSON
  lines, nRF Cloud onboarding CSVs and an Azure DPS enrollment group;
- :mod:`~factoryd.cloud.aws`: the lot's CA and devices registered straight into AWS IoT (boto3,
  the ``aws`` extra), resumable from the ledger's record of each certificate's progress.
"""
