-- Retention: AuditEvents are pruned by age with their own setting; this serves that query.
CREATE INDEX resource_version_audit_event_age ON fhir_outbox.resource_version (last_updated)
    WHERE resource_type = 'AuditEvent';
