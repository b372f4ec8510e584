"""Ingestion: survey source trees, plan and convert scans to NIfTI, pseudonymise, write the manifest."""
