-- Planner statistics that follow the tables (docs/performance.md, run Y).
--
-- A statement prepared by a long-lived connection keeps its generic plan until the statistics of a
-- table it reads change. Plans made while the outbox was nearly empty (a new database, or an
-- outbox just pruned) join a batch's keys to it with a hash join over a sequential scan, which is
-- the right plan for a few hundred rows. In `bench --only capture` autovacuum had not analysed
-- the outbox after three minutes and 95,000 rows: the dispatcher's mark read the whole outbox in
-- every batch (1,131 of the 1,133 slow statements logged; 20 ms each at the median), and would
-- read millions of rows on a server whose autovacuum workers are busy with a large table.
--
-- The planner sizes a table by its current number of pages whenever it plans, so a plan made now
-- fits the table as it is now; what goes stale is a plan kept from when the table was much
-- smaller. An analysis replaces those plans (it invalidates every plan that reads the table).
-- `analyze_stale_tables` analyses the tables of this schema of at least 32 pages (256 KiB) that
-- have more than doubled in pages since their statistics were last taken (by autovacuum, by
-- VACUUM or by this function), unless they were analysed within `p_min_age`: a table that grows
-- steadily is analysed a few times over its life (from 32 pages to 1 GiB, 12 times), a table that
-- no longer grows never. The days of the history (`finished_delivery`, `delivery_attempt`,
-- `audit_event`) are left to autovacuum: the pipeline only appends to them, and a day's partition
-- filled in seconds by `bench --only e2e` cost 0.5-1 s of analyses in a 12 s run. Every worker calls it every few seconds (`operations::statistics`), one
-- at a time (a try-lock: the others skip). An analysis waits at most 50 ms for its table's lock
-- (`lock_timeout`): a longer wait would cancel an autovacuum of that table after
-- `deadlock_timeout`; the table is then skipped until the next call. It runs as the schema's
-- owner, as ANALYZE needs.
CREATE FUNCTION fhir_outbox.analyze_stale_tables(p_min_age interval)
RETURNS TABLE (table_name text, pages_before bigint, pages bigint)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_block_size bigint := current_setting('block_size')::bigint;
    v_table      record;
BEGIN
    IF NOT pg_try_advisory_xact_lock(hashtext('fhir_outbox.planner_statistics')) THEN
        RETURN;
    END IF;
    PERFORM set_config('lock_timeout', '50ms', true);
    FOR v_table IN
        SELECT t.relname, t.relpages, t.pages
        FROM (SELECT c.oid, c.relname, greatest(c.relpages, 0)::bigint AS relpages,
                     pg_relation_size(c.oid) / v_block_size AS pages
              FROM pg_class c
              JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = 'fhir_outbox' AND c.relkind = 'r'
                AND NOT EXISTS (SELECT FROM pg_inherits i JOIN pg_class h ON h.oid = i.inhparent
                                WHERE i.inhrelid = c.oid
                                  AND h.relname IN ('finished_delivery', 'delivery_attempt', 'audit_event'))) t
        LEFT JOIN pg_stat_user_tables s ON s.relid = t.oid
        WHERE t.pages >= 32 AND t.pages > 2 * t.relpages
          AND coalesce(greatest(s.last_analyze, s.last_autoanalyze), '-infinity') < now() - p_min_age
        ORDER BY t.pages DESC
    LOOP
        BEGIN
            EXECUTE format('ANALYZE fhir_outbox.%I', v_table.relname);
        EXCEPTION WHEN lock_not_available THEN
            CONTINUE;
        END;
        table_name := v_table.relname;
        pages_before := v_table.relpages;
        pages := v_table.pages;
        RETURN NEXT;
    END LOOP;
END
$$;

REVOKE EXECUTE ON FUNCTION fhir_outbox.analyze_stale_tables(interval) FROM PUBLIC;
