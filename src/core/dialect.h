/* What differs between the two supported cores (spec/cores.md §11): for
 * now, which core a binary is and its version, from the first line of its
 * version output. Later: service paths, type strings, cipher enums. */
#ifndef PN_CORE_DIALECT_H
#define PN_CORE_DIALECT_H

enum pn_core_kind { PN_CORE_UNKNOWN = 0, PN_CORE_XRAY, PN_CORE_V2RAY };

struct pn_core_version {
    enum pn_core_kind kind;
    int major, minor, patch;
    char text[32]; /* "4.34.0" */
};

/* Applies `^(Xray|V2Ray) (\d+)\.(\d+)\.(\d+)` to the first line of text.
 * Returns PN_OK or PN_ERR_INVAL. */
int pn_core_parse_version(const char *text, struct pn_core_version *out);
const char *pn_core_kind_name(enum pn_core_kind kind);

#endif
