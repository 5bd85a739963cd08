-- Dispatch: outbox rows become delivery rows, one per matching rest-hook subscription.

-- An outbox row is dispatched once its deliveries are enqueued (in the same transaction).
ALTER TABLE fhir_outbox.outbox
    ADD COLUMN dispatched_at timestamptz,
    -- Set when the row could not be dispatched at all (its version is missing, …): it is marked
    -- dispatched with the reason rather than retried forever, so one bad row never wedges dispatch.
    ADD COLUMN dispatch_error text;
-- Serves exactly the claim query: the oldest undispatched rows.
CREATE INDEX outbox_undispatched ON fhir_outbox.outbox (seq) WHERE dispatched_at IS NULL;

ALTER TABLE fhir_outbox.project
    -- Subscriptions of a server-scope project apply to changes in every project, when the server
    -- setting allows it (Medplum's project-less, server-scoped subscriptions).
    ADD COLUMN server_scope boolean NOT NULL DEFAULT false,
    -- Bumped by every write of one of the project's Subscriptions, so that every dispatcher, on any
    -- host, knows when its cached subscriptions are stale.
    ADD COLUMN subscription_epoch bigint NOT NULL DEFAULT 0;

-- One per (change, matching subscription). Delivery state lives here, visible to SQL.
CREATE TABLE fhir_outbox.delivery (
    id                      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- Sent as `webhook-id`: unique per delivery, the same on every retry of it.
    webhook_id              uuid NOT NULL DEFAULT gen_random_uuid(),
    -- The subscription's project owns the delivery.
    project_id              uuid NOT NULL,
    subscription_id         text NOT NULL,
    outbox_seq              bigint NOT NULL,
    -- The change, copied from the outbox so that pruning the outbox never affects delivery.
    resource_project_id     uuid NOT NULL,
    resource_type           text NOT NULL,
    resource_id             text NOT NULL,
    version_id              bigint NOT NULL,
    previous_version_id     bigint,
    interaction             text NOT NULL CHECK (interaction IN ('create', 'update', 'delete')),
    changed_at              timestamptz NOT NULL,
    request_id              text NOT NULL,
    trace_id                text NOT NULL,
    -- When the subscriptions were evaluated (shared by all deliveries of one change; AuditEvent
    -- period.start).
    matched_at              timestamptz NOT NULL,
    state                   text NOT NULL DEFAULT 'pending'
                            CHECK (state IN ('pending', 'in_flight', 'succeeded', 'skipped', 'failed')),
    attempts                integer NOT NULL DEFAULT 0,
    next_attempt_at         timestamptz NOT NULL DEFAULT now(),
    finished_at             timestamptz,
    -- Why it was skipped, or the last error.
    reason                  text,
    UNIQUE (outbox_seq, project_id, subscription_id)
);
CREATE INDEX delivery_due ON fhir_outbox.delivery (next_attempt_at) WHERE state = 'pending';
CREATE INDEX delivery_by_subscription ON fhir_outbox.delivery (project_id, subscription_id, id);

-- Problems found while evaluating a subscription: unsupported criteria constructs and invalid
-- criteria (once per subscription version), and evaluation errors (counted per message). A problem
-- with one subscription never stops the others; this is where operators see it.
CREATE TABLE fhir_outbox.subscription_issue (
    project_id           uuid NOT NULL,
    subscription_id      text NOT NULL,
    subscription_version bigint NOT NULL,
    kind                 text NOT NULL CHECK (kind IN ('unsupported', 'invalid', 'evaluation_error')),
    message              text NOT NULL,
    occurrences          bigint NOT NULL DEFAULT 1,
    first_seen           timestamptz NOT NULL DEFAULT now(),
    last_seen            timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (project_id, subscription_id, subscription_version, kind, message)
);

-- The write path now also bumps the subscription epoch and wakes dispatchers (LISTEN
-- fhir_outbox_change; PostgreSQL folds identical notifications of one transaction into one).
CREATE OR REPLACE FUNCTION fhir_outbox.write_version(
    p_project uuid, p_type text, p_id text, p_version bigint, p_previous bigint, p_interaction text,
    p_content jsonb, p_at timestamptz, p_author text, p_request_id text, p_trace_id text)
RETURNS void LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    INSERT INTO fhir_outbox.resource_version
        (project_id, resource_type, id, version_id, deleted, content, last_updated, author)
    VALUES (p_project, p_type, p_id, p_version, p_content IS NULL, p_content, p_at, p_author);
    IF p_type = 'Subscription' THEN
        UPDATE fhir_outbox.project SET subscription_epoch = subscription_epoch + 1 WHERE id = p_project;
    END IF;
    -- AuditEvents never trigger subscriptions (delivery itself writes them, this prevents loops).
    IF p_type <> 'AuditEvent' THEN
        INSERT INTO fhir_outbox.outbox (project_id, resource_type, resource_id, version_id,
                                        previous_version_id, interaction, changed_at, request_id, trace_id)
        VALUES (p_project, p_type, p_id, p_version, p_previous, p_interaction, p_at, p_request_id, p_trace_id);
        PERFORM pg_notify('fhir_outbox_change', '');
    END IF;
END
$$;
