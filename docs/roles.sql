-- Least-privilege roles for fhir-outbox. Run once per database, as the role that ran the migrations
-- (the schema owner), after `fhir-outbox migrate`; safe to run again after later migrations.
--
--   fhir_outbox_writer  applications that write FHIR resources: they call the store's functions
--                       (create_resource, update_resource, delete_resource, read_resource,
--                       vread_resource, resource_history) and can touch nothing else: not the tables,
--                       not the outbox, not delivery state.
--   fhir_outbox_worker  `fhir-outbox run`: reads resources and subscriptions, owns dispatch and
--                       delivery state, writes AuditEvents through the store. It owns no object, so it
--                       cannot alter, drop or create schema objects.
--
-- Give them to login roles, e.g.:
--   CREATE ROLE billing_app LOGIN PASSWORD '…' IN ROLE fhir_outbox_writer;
--   CREATE ROLE outbox_worker LOGIN PASSWORD '…' IN ROLE fhir_outbox_worker;
-- Migrations keep running as the owner (`fhir-outbox migrate` with the owner's DATABASE_URL).
-- Projects are created by the owner too (`fhir_outbox.create_project`, `fhir-outbox project create`):
-- neither role may create one, since a server-scope project's subscriptions see every project.

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'fhir_outbox_writer') THEN
        CREATE ROLE fhir_outbox_writer NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'fhir_outbox_worker') THEN
        CREATE ROLE fhir_outbox_worker NOLOGIN;
    END IF;
END
$$;

GRANT USAGE ON SCHEMA fhir_outbox TO fhir_outbox_writer, fhir_outbox_worker;

-- Writers: the store's functions only (they run as their owner, see migration 6). The trigger that
-- decides at commit whether to wake a dispatcher runs as its owner too (migration 7).
GRANT EXECUTE ON FUNCTION
    fhir_outbox.create_resource(uuid, jsonb, text, text, text),
    fhir_outbox.create_resources(uuid, jsonb[], text, text, text),
    fhir_outbox.update_resource(uuid, text, text, jsonb, bigint, text, text, text),
    fhir_outbox.delete_resource(uuid, text, text, text, text, text),
    fhir_outbox.read_resource(uuid, text, text),
    fhir_outbox.vread_resource(uuid, text, text, bigint),
    fhir_outbox.resource_history(uuid, text, text)
TO fhir_outbox_writer;

-- The worker.
GRANT SELECT ON ALL TABLES IN SCHEMA fhir_outbox TO fhir_outbox_worker;
GRANT INSERT, UPDATE, DELETE ON
    fhir_outbox.outbox, fhir_outbox.delivery, fhir_outbox.unfinished_delivery,
    fhir_outbox.finished_delivery, fhir_outbox.delivery_attempt, fhir_outbox.audit_event,
    fhir_outbox.subscription_issue, fhir_outbox.subscription_pause, fhir_outbox.subscription_failure,
    fhir_outbox.dispatcher_waiting, fhir_outbox.endpoint_circuit, fhir_outbox.claim_cursor,
    fhir_outbox.console_token, fhir_outbox.subscription_event_count
TO fhir_outbox_worker;
-- Retention of AuditEvents deletes their versions.
GRANT DELETE ON fhir_outbox.resource, fhir_outbox.resource_version TO fhir_outbox_worker;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA fhir_outbox TO fhir_outbox_worker;
-- Delivery and attempt ids (history partitions are created and dropped by functions that run as
-- their owner: the worker creates no table).
GRANT USAGE ON SEQUENCE fhir_outbox.delivery_id_seq, fhir_outbox.delivery_attempt_id_seq
TO fhir_outbox_worker;
-- Readiness checks that the schema is current.
GRANT SELECT ON public._sqlx_migrations TO fhir_outbox_worker;
