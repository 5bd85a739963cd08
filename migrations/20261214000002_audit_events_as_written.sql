-- AuditEvents are stored as written (`json`), not converted to `jsonb` (docs/performance.md, run W).
-- One is written per delivery attempt and read rarely (by id, through `read_resource`, `vread` and
-- history, which return `jsonb` as before). Converting ~900 bytes of JSON text to `jsonb` took
-- about 9.5 us per event in the recorder's statement (psql: the insert of 200 AuditEvents was 3.1
-- of the completion's 8.0 ms); checking it as `json` about 2 us. `->` and `->>` read a `json`
-- column as they read `jsonb` (README's queries are unchanged); `jsonb` values are assigned to it
-- with PostgreSQL's assignment cast.

ALTER TABLE fhir_outbox.audit_event ALTER COLUMN content TYPE json USING content::json;

CREATE OR REPLACE FUNCTION fhir_outbox.stored_audit_event(p_project uuid, p_id text) RETURNS jsonb
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT a.content::jsonb FROM fhir_outbox.audit_event a
    WHERE a.project_id = p_project AND a.id = p_id
      AND (fhir_outbox.uuid_v7_time(p_id) IS NULL
           OR a.recorded_at BETWEEN fhir_outbox.uuid_v7_time(p_id)
                                AND fhir_outbox.uuid_v7_time(p_id) + interval '1 millisecond')
$$;
