-- Delivery: leases on deliveries in flight, and one attempt row per HTTP attempt.

ALTER TABLE fhir_outbox.delivery
    -- Each claim takes a lease: a token that fences every completion (a worker whose lease expired can
    -- never overwrite a newer attempt) and an expiry after which another worker may take it over.
    ADD COLUMN lease_token         uuid,
    ADD COLUMN lease_expires_at    timestamptz,
    -- Executions of any kind, for the hard cap (19, Medplum's MAX_JOB_ATTEMPTS).
    ADD COLUMN claims              integer NOT NULL DEFAULT 0,
    -- Infrastructure failures before any HTTP request (database trouble): their own budget of 19,
    -- never counted against the subscription's max attempts. `attempts` counts HTTP attempts.
    ADD COLUMN preamble_failures   integer NOT NULL DEFAULT 0,
    -- Status of the last HTTP response, if any.
    ADD COLUMN last_status         integer;

-- Serves the claim of expired leases.
CREATE INDEX delivery_leased ON fhir_outbox.delivery (lease_expires_at) WHERE state = 'in_flight';

-- One row per HTTP attempt (or refused connection): the attempt log.
CREATE TABLE fhir_outbox.delivery_attempt (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    delivery_id     bigint NOT NULL,
    project_id      uuid NOT NULL,
    subscription_id text NOT NULL,
    -- 1 for the first attempt.
    attempt         integer NOT NULL,
    started_at      timestamptz NOT NULL,
    duration_ms     integer NOT NULL,
    succeeded       boolean NOT NULL,
    status          integer,
    error           text,
    -- The first bytes of the response body (bounded).
    response_body   text,
    -- The AuditEvent recorded for this attempt (NULL when its destination is `log` only).
    audit_event_id  text
);
CREATE INDEX delivery_attempt_by_delivery ON fhir_outbox.delivery_attempt (delivery_id);
