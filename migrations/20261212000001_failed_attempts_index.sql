-- The console's overview names the subscriptions failing in the last hour. It counted them from
-- every attempt of the hour, fetching each attempt's row for its subscription (`subscription_id` is
-- not in `delivery_attempt_recent`): 30-37 ms of a 57 ms overview at 41,000 attempts an hour
-- (docs/performance.md, run S). This index holds the failed attempts only, with what the overview
-- counts, so that it reads the failures of the hour and nothing else.
--
-- Only failed attempts pay for it (one index entry each); successful ones, the pipeline's common
-- case, write nothing more. Built on the partitioned table, so every partition gets it and
-- `ensure_history_partitions` creates the next days' with it. On an installation with a long
-- history the build reads every partition once (it blocks attempts being recorded while it runs);
-- retention keeps that to the days kept.
CREATE INDEX delivery_attempt_failures ON fhir_outbox.delivery_attempt (started_at)
    INCLUDE (project_id, subscription_id)
    WHERE NOT succeeded;
