//! Point-in-time retention policy (placeholder until the restore-point work lands).
