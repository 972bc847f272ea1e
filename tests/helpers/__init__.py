"""Test helpers, imported as ``from tests.helpers.<module> import …`` (no tests here).

- ``boards``: short reply timeouts and fault-plan boards for the simulator;
- ``mqtt_broker``: throwaway mosquitto brokers, a recorder, a TCP gate (and their fixtures);
- ``station``: a whole station (hub, ledger, lot) on simulated boards in this process;
- ``line_procs``: stations and simulated hubs as separate processes;
- ``api``: a live HTTP API on a throwaway SQLite ledger;
- ``postgres``: a throwaway PostgreSQL cluster for the whole session (``initdb`` in a temp dir);
- ``provisioned``: ledgers full of provisioned devices without boards (exports, registration);
- ``imgtool``: MCUboot keys and images made by imgtool, MCUboot's own tool (the verifier's oracle).
"""
