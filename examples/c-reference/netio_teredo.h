/*
 * The kernel-mode declarations of the netio.sys Teredo API, as Netioapi.h gives them to a
 * WDK build (NETIO_STATUS is NTSTATUS and NETIOAPI_API_ is NTAPI in kernel mode).
 *
 * mingw-w64's netioapi.h cannot be included after its ddk/ntddk.h: it pulls in the Winsock
 * headers (ws2def.h, ws2ipdef.h), which need user-mode types. The three functions and the
 * callback type are all this driver needs, so they are declared here instead.
 */
#ifndef NETIO_TEREDO_H
#define NETIO_TEREDO_H

#include <ntddk.h>

/* MIB_NOTIFICATION_TYPE: a C enum passed as a 32-bit int. */
typedef enum _MIB_NOTIFICATION_TYPE {
    MibParameterNotification = 0,
    MibAddInstance = 1,
    MibDeleteInstance = 2,
    MibInitialNotification = 3
} MIB_NOTIFICATION_TYPE, *PMIB_NOTIFICATION_TYPE;

/* Invocations are serialized per registration; the IRQL is not documented (<= DISPATCH_LEVEL). */
typedef VOID (NTAPI *PTEREDO_PORT_CHANGE_CALLBACK)(
    _In_ PVOID CallerContext,
    _In_ USHORT Port,
    _In_ MIB_NOTIFICATION_TYPE NotificationType);

/* IRQL < DISPATCH_LEVEL. With InitialNotification = TRUE the callback runs once with
 * Port = 0 and MibInitialNotification, possibly before *NotificationHandle is written. */
NTSTATUS NTAPI NotifyTeredoPortChange(
    _In_ PTEREDO_PORT_CHANGE_CALLBACK Callback,
    _In_ PVOID CallerContext,
    _In_ BOOLEAN InitialNotification,
    _Inout_ HANDLE *NotificationHandle);

/* IRQL < DISPATCH_LEVEL. ERROR_NOT_READY (a Win32 code) while the Teredo client is stopped. */
NTSTATUS NTAPI GetTeredoPort(_Out_ USHORT *Port);

/* IRQL == PASSIVE_LEVEL. Waits for a callback in flight; must not be called from inside a
 * callback of the same handle (a deadlock). */
NTSTATUS NTAPI CancelMibChangeNotify2(_In_ HANDLE NotificationHandle);

#endif /* NETIO_TEREDO_H */
