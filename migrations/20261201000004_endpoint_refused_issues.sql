-- A subscription whose endpoint the outbound URL check refuses with the server's current setting
-- (`http`, a private or local address, without allow-unsafe-outbound) is recorded once per version
-- with kind `endpoint_refused`; the changes it matches become `skipped` deliveries whose reason
-- starts with "endpoint refused by the outbound URL check: " (`retry` re-queues them).
ALTER TABLE fhir_outbox.subscription_issue
    DROP CONSTRAINT subscription_issue_kind_check,
    ADD CONSTRAINT subscription_issue_kind_check
        CHECK (kind IN ('unsupported', 'invalid', 'evaluation_error', 'budget_exhausted',
                        'endpoint_refused'));
