-- The W3C trace context (traceparent) of the call that submitted a run: every step attempt's
-- span, on whichever worker, joins that trace.
ALTER TABLE runs ADD COLUMN trace_parent TEXT;
