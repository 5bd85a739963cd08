-- The delivery list with a time window (`since` $6, `until` $7): newest change first, then newest
-- id. Ordered by `changed_at` so that every partition's `(project_id, changed_at)` index serves the
-- order and a page reads about a page of rows. Ordered by id, as the list without a window is, the
-- planner would walk the id indexes from the newest delivery back to the window, since ids and change
-- times grow together and its estimates assume they do not: reading the whole history after `until`.
-- The cursor is the last row's id; $8 is its `changed_at`, so the page continues after ($8, $9).
-- The plan is pinned by the test `console_api::a_time_window_page_reads_the_change_time_indexes`.
SELECT id AS "id!", webhook_id AS "webhook_id!", project_id AS "project_id!",
       subscription_id AS "subscription_id!",
       resource_type || '/' || resource_id AS "resource!",
       version_id AS "version_id!", interaction AS "interaction!",
       state AS "state!: DeliveryState", attempts AS "attempts!", last_status,
       changed_at AS "changed_at!", next_attempt_at AS "next_attempt_at!", finished_at,
       reason, notification AS "notification: Notification", event_number
FROM fhir_outbox.delivery
WHERE project_id = $1
  AND ($2::text IS NULL OR state = $2)
  AND ($3::text IS NULL OR subscription_id = $3)
  AND ($4::text IS NULL OR (resource_type = $4 AND resource_id = $5))
  AND ($6::timestamptz IS NULL OR changed_at >= $6)
  AND ($7::timestamptz IS NULL OR changed_at < $7)
  AND ($8::timestamptz IS NULL OR changed_at <= $8)
  AND ($8::timestamptz IS NULL OR changed_at < $8 OR id < $9)
ORDER BY changed_at DESC, id DESC
LIMIT $10
