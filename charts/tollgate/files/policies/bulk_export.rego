# Bulk export is refused: tools labelled tollgate.dev/kind=bulk-export, and any call asking
# for more than bulk_export_max records at once (limit, page_size, per_page, count in the body
# or the query). Config: bulk_export_max (default 1000).
package tollgate

import rego.v1

bulk_max := object.get(data.tollgate_config, "bulk_export_max", 1000)

bulk_size_fields := ["limit", "page_size", "per_page", "count"]

bulk_requested contains n if {
	some f in bulk_size_fields
	some src in [input.request.body, input.request.query]
	v := src[f]
	n := to_number(v)
}

deny contains msg if {
	input.tool.labels["tollgate.dev/kind"] == "bulk-export"
	msg := sprintf("%v is a bulk export; agents may not export data in bulk", [input.tool.name])
}

deny contains msg if {
	some n in bulk_requested
	n > bulk_max
	msg := sprintf("%v asks for %v records at once, over the bulk export limit %v", [input.tool.name, n, bulk_max])
}
